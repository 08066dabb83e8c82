"""Any ``torch.nn.Module`` as a few-shot model's body, run as a function of explicit
parameters through ``torch.func.functional_call``, with the Conv4's linear head on top.

Where the module comes from (``model.name``):
- ``torchvision:NAME``: one of torchvision's image classification models
  (``torchvision.models.list_models(module=torchvision.models)``), built with
  ``weights=None``. Its last ``nn.Linear`` (the classifier) becomes an identity, so it
  yields the features that layer took. One-channel images (Omniglot) are repeated to the
  three channels these models take.
- ``python:package.module:callable``: a factory, called with no arguments, that returns a
  module mapping [N, C, H, W] images to [N, D] features. Importing it runs code, so a
  checkpoint that names one is only rebuilt on request (``metadist.models.model_from_spec``).

The parameters are the module's ``named_parameters()``, names kept, plus ``head.weight``
and ``head.bias``. The module object itself holds no values: its tensors live on the meta
device, and every call supplies the parameters, so a large backbone is held once, in the
parameter dict the algorithms adapt, and nothing of it is state.

Batch norm is transductive, as the Conv4's: every batch-norm module drops its running
statistics (``track_running_stats=False``, the buffers removed), so it normalises with
the batch's own statistics at training and at test, and a call mutates nothing, which is
what lets ``torch.func.vmap`` run it. The module runs in eval mode: dropout and other
training-time randomness are off (vmap refuses random numbers). A module that keeps any
other buffer is refused, named: a buffer is state beside the parameters that the inner
loop would neither adapt nor carry per task.

There is one implementation, torch's own layers (``impls``): second-order MAML under vmap
needs metadist's im2col layers (``metadist.models.layers``), so there it runs the loop.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metadist.models import layers

Params = dict[str, Tensor]

TORCHVISION, PYTHON = "torchvision:", "python:"
SOURCES = (TORCHVISION, PYTHON)
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_PYTHON_SOURCE = re.compile(rf"python:({_DOTTED}):({_DOTTED})")
_NORMS = nn.modules.batchnorm._NormBase  # batch and instance norm: the ones with running stats


def torchvision_models() -> list[str]:
    """The names ``torchvision:NAME`` accepts."""
    import torchvision.models  # here: it takes seconds, and only these models need it

    return torchvision.models.list_models(module=torchvision.models)


def check_source(source: str) -> None:
    """ValueError for a ``source`` that names no backbone. Imports nothing but torchvision:
    a ``python:`` source is only checked for its form."""
    if source.startswith(TORCHVISION):
        name, known = source[len(TORCHVISION):], torchvision_models()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise ValueError(f"{name!r} is not one of torchvision's image classification "
                             "models (torchvision.models.list_models(module="
                             f"torchvision.models))" + (f"; did you mean {close}?" if close
                                                        else ""))
    elif source.startswith(PYTHON):
        if not _PYTHON_SOURCE.fullmatch(source):
            raise ValueError(f"{source!r} is not of the form python:package.module:callable")
    else:
        raise ValueError(f"{source!r} is neither torchvision:NAME nor "
                         "python:package.module:callable")


@dataclass(frozen=True)
class ModuleBackbone:
    source: str  # torchvision:NAME | python:package.module:callable
    ways: int
    in_channels: int = 3
    image_size: int = 84

    head_keys = ("head.weight", "head.bias")
    impls = ("native",)

    def __post_init__(self) -> None:
        check_source(self.source)
        if self.source.startswith(TORCHVISION) and self.in_channels not in (1, 3):
            raise ValueError(f"{self.source} takes 3-channel (or 1-channel, repeated) images, "
                             f"and these have {self.in_channels}")
        # torchvision's constructors run on the meta device, allocating nothing; a user's
        # may keep plain tensors it makes there, so it is built for real, then moved.
        where = torch.device("meta") if self.source.startswith(TORCHVISION) \
            else contextlib.nullcontext()
        with where:
            module = self._prepared()
        module = module.to("meta")
        names = [k for k, _ in module.named_parameters()]
        taken = sorted(set(names) & set(self.head_keys))
        if taken:
            raise ValueError(f"{self.source}: the module has parameters named {taken}, "
                             "which are the head's: rename its submodule")
        norms = tuple(f"{prefix}.{k}" if prefix else k
                      for prefix, m in module.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      for k, _ in m.named_parameters(recurse=False))
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_names", tuple(names))
        object.__setattr__(self, "_norm_keys", norms)
        object.__setattr__(self, "_feature_dim", self._probe(module))

    @property
    def module(self) -> nn.Module:
        """The prepared module; its tensors are on the meta device (call it through
        ``functional_call`` with real parameters)."""
        return self._module

    @property
    def norm_keys(self) -> tuple[str, ...]:
        """The batch-norm weights and biases (MAML++ keeps a copy per inner step)."""
        return self._norm_keys

    @property
    def feature_dim(self) -> int:
        return self._feature_dim

    def init_params(self, generator: torch.Generator | None = None) -> Params:
        """A freshly built module's parameters (its own initialisation, seeded from
        ``generator``) and a Xavier-initialised head."""
        if generator is None:
            module = self._prepared()
        else:
            seed = int(torch.randint(2**62, (), generator=generator))
            with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
                torch.manual_seed(seed)
                module = self._prepared()
        params = {k: v.detach() for k, v in module.named_parameters()}
        return {**params, **layers.head_params(self.ways, self.feature_dim, generator)}

    def features(self, params: Params, x: Tensor, impl: str = "native") -> Tensor:
        if impl != "native":
            raise ValueError(
                f"{self.source} runs on torch's own layers, not on metadist's im2col layers "
                f"(impl={impl!r}) that second-order MAML needs under vmap: use "
                "train.inner_loop=loop (or auto, which picks it)")
        if self.source.startswith(TORCHVISION) and self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return torch.func.functional_call(self._module, {k: params[k] for k in self._names},
                                          (x,), strict=True)

    def head(self, params: Params, features: Tensor) -> Tensor:
        return layers.head(params, features)

    def __call__(self, params: Params, x: Tensor, impl: str = "native") -> Tensor:
        return self.head(params, self.features(params, x, impl))

    # -- building the module ---------------------------------------------------------

    def _factory(self) -> Callable[[], object]:
        if self.source.startswith(TORCHVISION):
            import torchvision.models

            name = self.source[len(TORCHVISION):]
            return lambda: torchvision.models.get_model(name, weights=None)
        module_name, attr = _PYTHON_SOURCE.fullmatch(self.source).groups()
        try:
            found = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"{self.source}: cannot import {module_name!r} ({err}); it must "
                             "be importable where metadist runs, on every worker (installed, "
                             "or on PYTHONPATH)") from None
        for part in attr.split("."):
            if not hasattr(found, part):
                raise ValueError(f"{self.source}: {module_name!r} has no {attr!r}")
            found = getattr(found, part)
        if not callable(found):
            raise ValueError(f"{self.source}: {attr!r} is not callable")
        return found

    def _construct(self) -> nn.Module:
        """The factory's module, on the default device; a constructor that computes with
        its own tensors (torchvision's RegNets) cannot run on the meta device, and is run
        on the CPU and moved."""
        factory = self._factory()
        try:
            module = factory()
        except Exception:
            if torch.get_default_device().type != "meta":
                raise
            with torch.device("cpu"):
                module = factory().to("meta")
        if not isinstance(module, nn.Module):
            raise ValueError(f"{self.source} returned a {type(module).__name__}, not a "
                             "torch.nn.Module")
        return module

    def _prepared(self) -> nn.Module:
        """The module as the model runs it: classifier gone (torchvision), batch norm
        transductive, no buffers, eval mode."""
        module = self._construct()
        if self.source.startswith(TORCHVISION):
            linears = [k for k, m in module.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(f"{self.source} has no nn.Linear classifier to replace; "
                                 "give a python:package.module:callable factory instead")
            parent, _, child = linears[-1].rpartition(".")
            setattr(module.get_submodule(parent), child, nn.Identity())
        for m in module.modules():
            if isinstance(m, _NORMS):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
        buffers = [k for k, _ in module.named_buffers()]
        if buffers:
            shown = buffers[:5] + ([f"... ({len(buffers)} in all)"] if len(buffers) > 5 else [])
            raise ValueError(
                f"{self.source}: the module keeps buffers {shown}; metadist's models are "
                "functions of their parameters alone (batch norm's running statistics are "
                "dropped here; other state is not supported)")
        return module.eval()

    def _probe(self, module: nn.Module) -> int:
        """The feature dimension, from a forward pass on the meta device (no compute), or,
        where the module cannot run there (it reads values), on the CPU."""
        channels = 3 if self.source.startswith(TORCHVISION) else self.in_channels
        shape = (2, channels, self.image_size, self.image_size)
        try:
            out = torch.func.functional_call(module, dict(module.named_parameters()),
                                             (torch.empty(shape, device="meta"),))
        except Exception:
            try:
                with torch.device("cpu"), torch.no_grad():
                    out = self._prepared()(torch.randn(shape))
            except Exception as err:  # the module's own error, whatever its type
                detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise ValueError(f"{self.source} does not take {channels}x{self.image_size}x"
                                 f"{self.image_size} images: {type(err).__name__}: {detail}"
                                 ) from None
        if not isinstance(out, Tensor) or out.ndim != 2:
            what = (f"shape {list(out.shape)}" if isinstance(out, Tensor)
                    else type(out).__name__)
            raise ValueError(f"{self.source} yields {what}, not [N, D] features")
        return int(out.shape[1])
