"""gateway_svc: the Phoenix Channels WebSocket endpoint; channel events become TaskService calls."""
