"""XLA (TPU, or XLA's CPU backend under PJRT_DEVICE=CPU): what the training loop needs there.

Nothing here imports torch_xla unless the run's device is an XLA device.
"""

from pathlib import Path

import torch

from mpp.errors import UsageError


def is_xla(device: torch.device) -> bool:
    return device.type == "xla"


def refuse_compile_on_xla(compile: bool, device: torch.device) -> None:
    """torch.compile's inductor backend does not target XLA devices; XLA compiles every step graph itself."""
    if compile and is_xla(device):
        raise UsageError(
            "--compile is for CUDA and CPU runs; on XLA (TPU) the step is already compiled by XLA: leave it out"
        )


def seed_micro_batch(device: torch.device, seed: int, process: int, epoch: int, batch: int) -> None:
    """On XLA, set the device's RNG seed from (seed, process, epoch, micro-batch) before each step.

    torch_xla advances its seed at every sync (mark_step), and how many syncs come between a
    checkpoint and the next step differs between a run that goes on and one that resumes
    (accelerate's wait_for_everyone is a rendezvous; torch_xla's loader syncs per batch): the saved
    seed does not give the resumed run the corruptions the uninterrupted run draws. A seed that is a
    function of the batch's place in the run does. The seed is data in the graph, not a constant:
    setting it each step compiles nothing new.
    """
    if is_xla(device):
        import torch_xla.core.xla_model as xm

        mixed = seed
        for part in (process, epoch, batch):
            mixed = (mixed * 1_000_003 + part) % 2**63
        xm.set_rng_state(mixed)


def make_loader_checkpointable() -> None:
    """accelerate's save_state / load_state read `.dataset` of every prepared loader, but on XLA the
    prepared loader is its MpDeviceLoaderWrapper, which has no such attribute (accelerate 1.15:
    AttributeError at the first checkpoint). Forward `dataset` and the sampler accessors that
    checkpointing uses to the DataLoaderShard it wraps. A later accelerate that has them is left alone."""
    from accelerate.data_loader import MpDeviceLoaderWrapper  # defined only where torch_xla imports

    def forward(name):
        return property(lambda self: getattr(self._loader, name))

    for name in ("dataset", "get_sampler", "set_sampler"):
        if not hasattr(MpDeviceLoaderWrapper, name):
            setattr(MpDeviceLoaderWrapper, name, forward(name))


def load_models_through_cpu(models: list, input_dir: str) -> None:
    """A load_state pre-hook (accelerate's register_load_state_pre_hook) for XLA: safetensors'
    load_model reads the storage pointers of the model's own tensors to find shared ones, which
    XLA tensors do not have ("Attempted to access the data pointer on an invalid python storage").
    Read each model file on the CPU and copy it in with load_state_dict (strict); emptying the list
    tells accelerate the models are done. Files other than safetensors are left to accelerate."""
    from accelerate.utils import SAFE_MODEL_NAME
    from safetensors.torch import load_file

    files = [Path(input_dir) / f"{SAFE_MODEL_NAME}{f'_{i}' if i else ''}.safetensors" for i in range(len(models))]
    if not all(f.is_file() for f in files):
        return
    for model, f in zip(models, files):
        model.load_state_dict(load_file(f), strict=True)  # CPU tensors copied into the XLA parameters in place
    models.clear()


def sync_free_on_xla(optimizer, device: torch.device):
    """On XLA: the same optimiser as torch_xla's sync-free class, which skips a step on the device when its
    `found_inf` is set (the NaN guard), so no step waits for the host. Adam/AdamW/SGD only; others unchanged."""
    if not is_xla(device):
        return optimizer
    from torch_xla.amp import syncfree

    cls = {torch.optim.AdamW: syncfree.AdamW, torch.optim.Adam: syncfree.Adam, torch.optim.SGD: syncfree.SGD}.get(
        type(optimizer)
    )
    if cls is None:
        return optimizer
    allowed = cls.__init__.__code__.co_varnames
    defaults = {k: v for k, v in optimizer.defaults.items() if k in allowed}
    return _found_inf_attribute(cls)(optimizer.param_groups, **defaults)


def _found_inf_attribute(cls):
    """A subclass whose step() reads `found_inf` from an attribute, as torch's fused optimisers do
    (GradScaler's protocol, which loop.NonFiniteGuard follows), instead of from an argument."""

    class SyncFree(cls):
        _step_supports_amp_scaling = True  # what NonFiniteGuard (and GradScaler) test for

        def step(self, closure=None):
            found_inf = getattr(self, "found_inf", None)
            if found_inf is None:  # no guard: always the sync-free path, so the state keeps one layout
                found_inf = torch.zeros((), device=self.param_groups[0]["params"][0].device)
            return super().step(closure, found_inf=found_inf)

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            # torch puts a loaded 'step' on the CPU (what its own optimisers want); the sync-free kernels read it on the
            # device
            for param, state in self.state.items():
                if torch.is_tensor(state.get("step")) and state["step"].device != param.device:
                    state["step"] = state["step"].to(param.device)

    SyncFree.__name__ = SyncFree.__qualname__ = f"SyncFree{cls.__name__}"
    return SyncFree
