"""Publishing a registered model: the bundle serving reads, its versions, LATEST pointer and
history (`bundle`); building one with its explanations (`build`); the gate against the
champion (`gate`: its rule; `champion`: its evidence, the champion to weigh against and
both models' scores); rollback (`rollback`); and the publish flow's parameter (`spec`).
The registry's side of it is `mlpaint.tracking.publication`."""
