"""task_svc: one supervised TaskServer per task, a registry, and the durable job engine."""
