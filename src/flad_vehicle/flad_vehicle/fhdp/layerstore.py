"""The encoder layers a vehicle holds, with their optimizer state, and their moves between vehicles.

Dynamic stage exchange moves whole layers: parameters plus AdamW state (exp_avg, exp_avg_sq, step),
so a layer continues training on its new owner exactly as it would have on the old one. A payload
holds, per parameter `name`: `p/name` (weights) and, when the sender has optimizer state,
`m/name`, `v/name`, `t/name`. Payloads travel as safetensors (`flad_core.weights`).

Each vehicle keeps the whole (tiny) encoder object in memory for simplicity, but *owns* only its
layers: it trains, serves and reports only those, and the emulated memory accounting counts only
those.

A layer trains wherever its stage runs (a GPU, `runner.StageRunner`'s `device`); payloads are always CPU
tensors, so a CPU vehicle and a GPU vehicle exchange layers as they exchange frames. Optimizer state is kept
here on the CPU and put on its parameter's device when an optimizer is attached; a released layer goes back
to the CPU, so a GPU holds only the layers its vehicle trains.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from flad_core.weights import WeightsError


class LayerStore:
    def __init__(self, model: nn.Module, layer_names: Iterable[str]) -> None:
        self.model = model
        self.layer_names = list(layer_names)
        self.params = dict(model.named_parameters())
        self.owned: set[str] = set()
        self.opt_state: dict[str, dict[str, Tensor]] = {}
        self._by_layer = {layer: [n for n in self.params if n.startswith(f"layers.{layer}.")]
                          for layer in self.layer_names}

    def params_of(self, layers: Iterable[str]) -> list[str]:
        out = []
        for layer in layers:
            if layer not in self._by_layer:
                raise WeightsError(f"unknown layer {layer!r}")
            out += self._by_layer[layer]
        return out

    def layers_in(self, start: int, end: int) -> list[str]:
        return self.layer_names[start:end]

    # -- moving layers ----------------------------------------------------------------------------
    def export(self, layers: Iterable[str], with_optimizer: bool = True) -> dict[str, Tensor]:
        layers = list(layers)
        not_owned = [layer for layer in layers if layer not in self.owned]
        if not_owned:
            raise WeightsError(f"asked for layers this holder does not own: {not_owned[:5]}")
        out: dict[str, Tensor] = {}
        for name in self.params_of(layers):
            out[f"p/{name}"] = self.params[name].detach().to("cpu", copy=True)
            state = self.opt_state.get(name) if with_optimizer else None
            if state:
                out[f"m/{name}"] = state["exp_avg"].clone()
                out[f"v/{name}"] = state["exp_avg_sq"].clone()
                out[f"t/{name}"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1).clone()
        return out

    def import_(self, layers: Iterable[str], payload: Mapping[str, Tensor]) -> None:
        """Take ownership of `layers` from `payload`; every parameter must be present with its shape."""
        layers = list(layers)
        names = self.params_of(layers)
        expected = {f"p/{n}" for n in names}
        missing = sorted(expected - set(payload))
        if missing:
            raise WeightsError(f"layer payload lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        with torch.no_grad():
            for n in names:
                src = payload[f"p/{n}"]
                if src.shape != self.params[n].shape:
                    raise WeightsError(f"{n}: payload shape {list(src.shape)} != {list(self.params[n].shape)}")
                self.params[n].copy_(src)
                if f"m/{n}" in payload:
                    self.opt_state[n] = {"exp_avg": payload[f"m/{n}"].clone(), "exp_avg_sq": payload[f"v/{n}"].clone(),
                                         "step": payload[f"t/{n}"].reshape(()).clone()}
                else:
                    self.opt_state.pop(n, None)
        self.owned.update(layers)

    def release(self, layers: Iterable[str]) -> None:
        """Give up `layers` (and their optimizer state); any of them on a GPU moves back to the CPU."""
        for layer in layers:
            self.owned.discard(layer)
            for n in self._by_layer[layer]:
                self.opt_state.pop(n, None)
            if any(self.params[n].device.type != "cpu" for n in self._by_layer[layer]):
                self.model.get_submodule(f"layers.{layer}").to("cpu")

    def owned_bytes(self, with_optimizer: bool = True) -> int:
        total = 0
        for n in self.params_of(sorted(self.owned, key=self.layer_names.index)):
            size = self.params[n].numel() * self.params[n].element_size()
            total += size * (4 if with_optimizer else 1)   # weights, grads, Adam m and v
        return total

    # -- optimizer --------------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Load stored AdamW state into `optimizer` (built over the owned parameters), on each parameter's device;
        the `step` counter stays on the CPU, where AdamW keeps it (as `Optimizer.load_state_dict` does)."""
        by_id = {id(p): n for n, p in self.params.items()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = self.opt_state.get(by_id[id(p)])
                if state:
                    optimizer.state[p] = {k: v.clone() if k == "step" else v.to(p.device, copy=True)
                                          for k, v in state.items()}

    def detach(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep `optimizer`'s per-parameter state (before the optimizer is dropped at a switch), on the CPU."""
        by_id = {id(p): n for n, p in self.params.items()}
        for p, state in optimizer.state.items():
            if state:
                self.opt_state[by_id[id(p)]] = {k: (v.detach().to("cpu", copy=True) if isinstance(v, Tensor)
                                                    else torch.tensor(v))
                                                for k, v in state.items()}
