"""The publish flow's one parameter: which registered version to publish, where, and
how strictly the gate weighs it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PublishSpec(BaseModel):
    """What a publication does: which registered version, where to, and how the gate decides.
    The publish flow's one parameter (the Prefect run form's fields); validated here, once,
    naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str | None = Field(None, description="publish the version registered from this "
                                                 "MLflow run")
    model_version: str | None = Field(None, description="or this version of mnist-digits "
                                                        "(neither: the newest complete one)")
    to: str | None = Field(None, description="a folder or s3://bucket/prefix (default "
                                             "$MLPAINT_BUNDLE_DIR, <$MLPAINT_STORE>/bundles "
                                             "or .mlpaint/bundles)")
    force: bool = Field(False, description="promote even if worse than the champion")
    margin: float = Field(0.0, ge=0, le=1, description="test accuracy the candidate may lose "
                                                       "to the champion and still be promoted")
    retention: int = Field(5, ge=1, description="bundle versions kept at the destination")
    gallery_per_digit: int = Field(50, ge=1, description="explained test digits stored per "
                                                         "digit")
    sources: list[str] | None = Field(None, description="MNIST sources of the official test "
                                                        "set (default: the mirror chain)")
    feedback_store: str | None = Field(None, description="a feedback store whose wild test "
                                       "set the candidate must also not lose on")
    pen_sources: list[str] | None = Field(None, description="pen trajectories of the drawn "
                                          "test set (default: UCI's download, then the copy "
                                          "mlpaint ships)")

    @model_validator(mode="after")
    def _one_version_at_most(self) -> PublishSpec:
        if self.run_id and self.model_version:
            raise ValueError(f"run_id {self.run_id!r} and model_version "
                             f"{self.model_version!r}: name the version one way, not both")
        return self
