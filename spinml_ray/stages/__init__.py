"""The Ray layer: each stage wires pure functions into Ray Data, Ray Serve or Ray Train."""


class StageError(RuntimeError):
    """A stage that cannot complete for this request; the message says why."""


def unwrapped(model):
    """The model inside a DistributedDataParallel wrapper (`ray.train.torch.prepare_model`), else itself."""
    return model.module if hasattr(model, "module") else model
