"""The retry policy of tasks that call a service (the MLflow tracking server or registry, an
object store): such calls fail transiently, so they get two more tries, 5 s and then 20 s
later. Compute tasks get none: a fit that failed will fail again the same way. Neither do
errors that say the request itself is wrong — nothing to find (LookupError), a value this
version cannot use (ValueError) — which a retry would only repeat."""


def _worth_retrying(task, task_run, state) -> bool:
    try:
        state.result()
    except (LookupError, ValueError):
        return False
    except Exception:
        return True
    return True


SERVICE_CALL_RETRIES = {"retries": 2, "retry_delay_seconds": [5, 20],
                        "retry_condition_fn": _worth_retrying}
