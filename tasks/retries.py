"""The retry policy of tasks that call a service (the MLflow tracking server or registry, an
object store): such calls fail transiently, so they get two more tries, 5 s and then 20 s
later. Compute tasks get none: a fit that failed will fail again the same way."""

SERVICE_CALL_RETRIES = {"retries": 2, "retry_delay_seconds": [5, 20]}
