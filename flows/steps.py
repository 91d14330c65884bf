"""Steps that `prefect deploy` runs from prefect.yaml, on the machine that deploys.

Prefect's run forms (the UI's "Run > Custom run", old and new) submit every field they show:
each is filled from the deployment's parameters, and where those say nothing, from the
schema's defaults. A deployment that stored only the fields it changes would have its form
train the defaults for all the others. So a deployment names its spec and its changes here,
and stores the whole spec they make: the form shows, and the run trains, exactly that.
"""

from __future__ import annotations

from typing import Any

from mlpaint.training.algorithms import load_algorithms
from mlpaint.training.spec import load_spec


def experiment_spec(spec_path: str = "default",
                    changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """`{"spec": …}`: the whole ExperimentSpec named by `spec_path` (`default`, `champion`
    or a YAML file) with `changes` applied section by section, as JSON, for a deployment's
    `spec` parameter (`spec: "{{ <step id>.spec }}"`). Validated now, so `prefect deploy`
    refuses a spec that no run could train."""
    spec = load_spec(spec_path, changes=changes,
                     known_algorithms=frozenset(load_algorithms(None)))
    return {"spec": spec.model_dump(mode="json")}
