"""What happens to a job row beyond one process: terminal notifications (webhooks) and recovery (sweeper,
heartbeats). Shared by `api` and `worker`, so neither imports the other (DESIGN: api -> db <- worker)."""
