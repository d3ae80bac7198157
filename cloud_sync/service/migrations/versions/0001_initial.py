"""initial schema: registry, ledger, OTA history, rollouts, gate, telemetry

Revision ID: 0001
Revises: (none)
Create Date: 2026-12-06 21:33:21.332237
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('devices',
    sa.Column('device_id', sa.String(length=64), nullable=False),
    sa.Column('first_seen', sa.Float(), nullable=False),
    sa.Column('last_seen', sa.Float(), nullable=False),
    sa.Column('last_heard', sa.Float(), nullable=False),
    sa.Column('last_telemetry', sa.Float(), nullable=True),
    sa.Column('online', sa.Boolean(), nullable=True),
    sa.Column('offline_reason', sa.String(length=64), nullable=True),
    sa.Column('groups', sa.JSON(), nullable=False),
    sa.Column('models', sa.JSON(), nullable=False),
    sa.Column('last_ota', sa.JSON(), nullable=True),
    sa.Column('restarts', sa.Integer(), nullable=False),
    sa.Column('last_uptime_s', sa.Float(), nullable=True),
    sa.Column('latest_telemetry', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('device_id')
    )
    op.create_table('messages',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('device_id', sa.String(length=64), nullable=False),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('ts', sa.Float(), nullable=True),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('digest')
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index('ix_messages_channel_device', ['channel', 'device_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_messages_device_id'), ['device_id'], unique=False)

    op.create_table('rollouts',
    sa.Column('update_id', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=True),
    sa.Column('version', sa.String(length=64), nullable=True),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('ended_at', sa.Float(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('canaries', sa.JSON(), nullable=False),
    sa.Column('targets', sa.JSON(), nullable=False),
    sa.Column('decision', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('update_id')
    )
    op.create_table('telemetry_rollups',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('device_id', sa.String(length=64), nullable=False),
    sa.Column('bucket_start', sa.Float(), nullable=False),
    sa.Column('bucket_s', sa.Float(), nullable=False),
    sa.Column('samples', sa.Integer(), nullable=False),
    sa.Column('models', sa.String(length=255), nullable=True),
    sa.Column('fps_avg', sa.Float(), nullable=True),
    sa.Column('p99_ms_max', sa.Float(), nullable=True),
    sa.Column('p99_ms_avg', sa.Float(), nullable=True),
    sa.Column('dropped', sa.Integer(), nullable=True),
    sa.Column('errors', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('device_id', 'bucket_start', 'bucket_s')
    )
    op.create_table('telemetry_samples',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('device_id', sa.String(length=64), nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('sequence', sa.Integer(), nullable=True),
    sa.Column('models', sa.String(length=255), nullable=True),
    sa.Column('fps', sa.Float(), nullable=True),
    sa.Column('p50_ms', sa.Float(), nullable=True),
    sa.Column('p99_ms', sa.Float(), nullable=True),
    sa.Column('received', sa.Integer(), nullable=True),
    sa.Column('results', sa.Integer(), nullable=True),
    sa.Column('dropped', sa.Integer(), nullable=True),
    sa.Column('errors', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('telemetry_samples', schema=None) as batch_op:
        batch_op.create_index('ix_telemetry_device_ts', ['device_id', 'ts'], unique=False)

    op.create_table('version_changes',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('device_id', sa.String(length=64), nullable=False),
    sa.Column('update_id', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=True),
    sa.Column('from_version', sa.String(length=64), nullable=True),
    sa.Column('to_version', sa.String(length=64), nullable=True),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('ended_at', sa.Float(), nullable=True),
    sa.Column('last_state', sa.String(length=16), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('fps_before', sa.Float(), nullable=True),
    sa.Column('p99_before', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('device_id', 'update_id')
    )
    with op.batch_alter_table('version_changes', schema=None) as batch_op:
        batch_op.create_index('ix_version_changes_device', ['device_id', 'started_at'],
                              unique=False)

    op.create_table('gate_checks',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('update_id', sa.String(length=64), nullable=False),
    sa.Column('device_id', sa.String(length=64), nullable=False),
    sa.Column('metric', sa.String(length=32), nullable=False),
    sa.Column('before', sa.Float(), nullable=True),
    sa.Column('after', sa.Float(), nullable=True),
    sa.Column('peers', sa.Float(), nullable=True),
    sa.Column('samples', sa.Integer(), nullable=False),
    sa.Column('worse', sa.Boolean(), nullable=False),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('decided_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['update_id'], ['rollouts.update_id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('ota_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('message_id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.String(length=64), nullable=False),
    sa.Column('update_id', sa.String(length=64), nullable=True),
    sa.Column('model', sa.String(length=128), nullable=True),
    sa.Column('version', sa.String(length=64), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('check', sa.String(length=16), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('ts', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('message_id')
    )
    with op.batch_alter_table('ota_events', schema=None) as batch_op:
        batch_op.create_index('ix_ota_events_device_ts', ['device_id', 'ts'], unique=False)

    op.create_table('rollout_steps',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('update_id', sa.String(length=64), nullable=False),
    sa.Column('device_id', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['update_id'], ['rollouts.update_id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('update_id', 'device_id')
    )


def downgrade() -> None:
    op.drop_table('rollout_steps')
    with op.batch_alter_table('ota_events', schema=None) as batch_op:
        batch_op.drop_index('ix_ota_events_device_ts')

    op.drop_table('ota_events')
    op.drop_table('gate_checks')
    with op.batch_alter_table('version_changes', schema=None) as batch_op:
        batch_op.drop_index('ix_version_changes_device')

    op.drop_table('version_changes')
    with op.batch_alter_table('telemetry_samples', schema=None) as batch_op:
        batch_op.drop_index('ix_telemetry_device_ts')

    op.drop_table('telemetry_samples')
    op.drop_table('telemetry_rollups')
    op.drop_table('rollouts')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_messages_device_id'))
        batch_op.drop_index('ix_messages_channel_device')

    op.drop_table('messages')
    op.drop_table('devices')
