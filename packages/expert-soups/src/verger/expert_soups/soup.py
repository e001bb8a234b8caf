"""``SoupOfExperts``: theta(h) = S + sum_j alpha_j(h) E_j, a specialist for any domain weights h.

S is a plain :class:`~verger.core.nn.TransformerLM` (``soup.shared``); the experts of one
parameter are one stacked tensor ``[n, *shape]`` (or two low-rank factors); the coefficients
come from a small network of h. Training runs the shared model *functionally* on theta(h)
(``torch.func.functional_call``), so one backward reaches S, every expert and the coefficient
network. :meth:`SoupOfExperts.instantiate` evaluates the same weighted sums once, without
autograd, and returns an independent ``TransformerLM``: the specialist costs one weighted sum
per tensor, no training.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn
from torch.func import functional_call

from verger.core.files import atomic_write_bytes, atomic_write_text
from verger.core.nn import LMOutput, TransformerConfig, TransformerLM
from verger.expert_soups.config import DomainWeights, SoupConfig, check_domain_weights
from verger.expert_soups.ops import weighted_sum

CONFIG_NAME = "soup_config.json"
WEIGHTS_NAME = "soup.safetensors"
_TIED = "shared.lm_head.weight"
_MLP_WEIGHTS = ("mlp.w_gate.weight", "mlp.w_up.weight", "mlp.w_down.weight")


def _in_scope(name: str, scope: str) -> bool:
    if scope == "all":
        return True
    if scope == "blocks":
        return name.startswith("blocks.")
    return name.startswith("blocks.") and name.endswith(_MLP_WEIGHTS)


def _group(name: str, per_layer: bool) -> int:
    """Coefficient group of a tensor: 0 for model-level tensors, l + 1 for block l."""
    if not per_layer or not name.startswith("blocks."):
        return 0
    return int(name.split(".")[1]) + 1


def _init_std(name: str, shape: torch.Size, config: SoupConfig) -> float:
    """The init std of S's tensor ``name`` (GPT-2 scaled for residual outputs)."""
    std = config.model.init_std
    if name.endswith(("o_proj.weight", "mlp.w_down.weight")):
        std /= math.sqrt(2 * config.model.n_layers)
    return std


def _clone_tree(module: nn.Module) -> nn.Module:
    """A new module tree shaped like ``module``, without its parameters (to be assigned).

    ``copy.deepcopy`` of even a meta-device model costs milliseconds of Python per
    instantiation (it walks every attribute); this copies each module's attribute dict,
    with fresh containers (hooks, buffers, submodules) so nothing is shared between copies.
    """
    new = module.__class__.__new__(module.__class__)
    state = {
        key: value.copy() if isinstance(value, (dict, set, list)) else value
        for key, value in module.__dict__.items()
    }
    state["_parameters"] = dict.fromkeys(module._parameters)  # None until assigned
    state["_modules"] = {
        key: None if child is None else _clone_tree(child) for key, child in module._modules.items()
    }
    new.__dict__.update(state)
    return new


class CoefficientNet(nn.Module):
    """alpha(h): ``[k] -> [groups, n]``.

    ``kind="mlp"``: Linear -> GELU -> Linear (Soup-of-Experts). ``kind="linear"``: the
    bias-free product h E M of projected networks (E: a cluster embedding of width
    ``hidden``, M: one projection per group), linear in h.
    """

    def __init__(self, n_domains: int, n_experts: int, *, hidden: int, groups: int, kind: str):
        super().__init__()
        self.n_experts, self.groups, self.kind = n_experts, groups, kind
        if kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(n_domains, hidden), nn.GELU(), nn.Linear(hidden, groups * n_experts)
            )
        else:
            self.net = nn.Sequential(
                nn.Linear(n_domains, hidden, bias=False),
                nn.Linear(hidden, groups * n_experts, bias=False),
            )

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h).view(self.groups, self.n_experts)


class SoupOfExperts(nn.Module):
    """Shared parameters S (``shared``), stacked experts (``experts``) and alpha(h)
    (``coefficient_net``) over ``config.model``.

    >>> soup = SoupOfExperts(SoupConfig(model=cfg, n_domains=16, n_experts=8))
    >>> out = soup(inputs, targets, h=h)  # training forward on theta(h)
    >>> specialist = soup.instantiate(h)  # a plain TransformerLM
    """

    def __init__(self, config: SoupConfig) -> None:
        super().__init__()
        if not isinstance(config, SoupConfig):
            raise TypeError(f"SoupOfExperts: config must be a SoupConfig, got {config!r}")
        self.config = config
        self.shared = TransformerLM(config.model)
        n, rank = config.n_experts, config.expert_rank
        self.expert_names: list[str] = []
        self.experts = nn.ParameterDict()
        for name, param in self.shared.named_parameters():  # a tied weight appears once
            if not _in_scope(name, config.expert_scope):
                continue
            self.expert_names.append(name)
            std = _init_std(name, param.shape, config) * config.expert_init_scale
            key = self._key(name)
            if rank is not None and param.ndim == 2:
                # U V^T has std sqrt(rank) * std_u * std_v: split the target std evenly.
                factor = math.sqrt(std / math.sqrt(rank))
                out_dim, in_dim = param.shape
                self.experts[key + "__u"] = nn.Parameter(torch.randn(n, out_dim, rank) * factor)
                self.experts[key + "__v"] = nn.Parameter(torch.randn(n, in_dim, rank) * factor)
            else:
                self.experts[key] = nn.Parameter(torch.randn(n, *param.shape) * std)
        self.groups = {
            name: _group(name, config.per_layer_coefficients) for name in self.expert_names
        }
        self.coefficient_net = CoefficientNet(
            config.n_domains,
            n,
            hidden=config.coefficient_hidden,
            groups=config.n_groups,
            kind=config.coefficients,
        )

    @staticmethod
    def shared_parameter_shapes(model: TransformerConfig) -> dict[str, torch.Size]:
        """Shapes of S's tensors by name (a tied weight once), without allocating them."""
        with torch.device("meta"):
            return {n: p.shape for n, p in TransformerLM(model).named_parameters()}

    @staticmethod
    def expert_parameter_names(config: SoupConfig) -> list[str]:
        """Names of the tensors that have experts under ``config.expert_scope``."""
        names = SoupOfExperts.shared_parameter_shapes(config.model)
        return [n for n in names if _in_scope(n, config.expert_scope)]

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    # ------------------------------------------------------------------ domain weights
    def check_weights(self, h: DomainWeights) -> Tensor:
        """h as a float32 tensor on the soup's device (validated: see ``check_domain_weights``)."""
        values = check_domain_weights(h, self.config.n_domains, self.config.names)
        return values.to(self.shared.embed.weight.device)

    def coefficients(self, h: DomainWeights) -> Tensor:
        """alpha(h) ``[groups, n_experts]``."""
        return self.coefficient_net(self.check_weights(h))

    # ------------------------------------------------------------------ theta(h)
    def _mix(self, name: str, base: Tensor, alpha: Tensor) -> Tensor:
        key = self._key(name)
        if key in self.experts:
            return weighted_sum(base, self.experts[key], alpha)
        u, v = self.experts[key + "__u"], self.experts[key + "__v"]
        n, out_dim, rank = u.shape
        # sum_j alpha_j U_j V_j^T as one [out, n r] x [n r, in] product.
        left = (u * alpha.view(n, 1, 1)).permute(1, 0, 2).reshape(out_dim, n * rank)
        right = v.permute(1, 0, 2).reshape(v.shape[1], n * rank)
        return torch.addmm(base, left, right.t())

    def parameters_for(self, h: DomainWeights) -> dict[str, Tensor]:
        """theta(h): every parameter of the shared model, by name (S where no experts)."""
        alpha = self.coefficients(h)
        params: dict[str, Tensor] = dict(self.shared.named_parameters())
        for name in self.expert_names:
            params[name] = self._mix(name, params[name], alpha[self.groups[name]])
        return params

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        h: DomainWeights,
        return_logits: bool = False,
    ) -> LMOutput:
        """The shared model run on theta(h) (differentiable in S, the experts and alpha)."""
        params = self.parameters_for(h)
        out: LMOutput = functional_call(
            self.shared, params, (input_ids, targets), {"return_logits": return_logits}
        )
        return out

    @torch.no_grad()
    def instantiate(self, h: DomainWeights) -> TransformerLM:
        """An independent ``TransformerLM`` with weights theta(h) (one weighted sum per tensor).

        The module tree is cloned from a skeleton built once on the meta device (no random
        init, whose cost grows with the model) and takes the computed tensors as its
        parameters; shared tensors are copied, so training it leaves the soup intact.
        """
        params = self.parameters_for(h)
        model = _clone_tree(self._skeleton())
        assert isinstance(model, TransformerLM)
        for name, value in params.items():
            *path, leaf = name.split(".")
            owner: nn.Module = model
            for part in path:
                owner = owner._modules[part]  # type: ignore[assignment]
            tensor = value if name in self.groups else value.detach().clone()
            owner._parameters[leaf] = nn.Parameter(tensor)
        if self.config.model.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        model.config = copy.deepcopy(self.config.model)
        return model

    def _skeleton(self) -> TransformerLM:
        skeleton = self.__dict__.get("_meta_skeleton")
        if skeleton is None:  # kept out of the module tree: not a submodule, not in state_dict
            with torch.device("meta"):
                skeleton = TransformerLM(self.config.model)
            self.__dict__["_meta_skeleton"] = skeleton
        return skeleton

    # ------------------------------------------------------------------ sizes
    def num_parameters(self) -> int:
        """All trainable parameters: S, every expert and the coefficient network."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def num_instantiated_parameters(self) -> int:
        """Parameters of one instantiated model (the inference size)."""
        return self.shared.num_parameters()

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        """Write ``soup_config.json`` and ``soup.safetensors`` into ``directory`` (atomically)."""
        out = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.model.tie_embeddings:
            state.pop(_TIED, None)
        meta = {"format": "pt", "library": "verger.expert_soups", "class": type(self).__name__}
        atomic_write_bytes(out / WEIGHTS_NAME, save(state, metadata=meta))
        text = json.dumps(self.config.to_dict(), indent=2, allow_nan=False)
        atomic_write_text(out / CONFIG_NAME, text + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> SoupOfExperts:
        """Rebuild a soup written by :meth:`save`."""
        src = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (src / name).is_file():
                raise FileNotFoundError(f"SoupOfExperts.load: {src / name} does not exist")
        config = SoupConfig.from_dict(json.loads((src / CONFIG_NAME).read_text()))
        soup = cls(config)
        state = load_file(src / WEIGHTS_NAME, device="cpu")
        missing, unexpected = soup.load_state_dict(state, strict=False)
        allowed = {_TIED} if config.model.tie_embeddings else set()
        if set(missing) - allowed or unexpected:
            raise ValueError(
                f"SoupOfExperts.load: weights in {src} do not match the config: missing "
                f"{sorted(set(missing) - allowed)}, unexpected {sorted(unexpected)}"
            )
        return soup.to(device)

    def export_specialist(self, h: DomainWeights, directory: str | Path) -> Path:
        """``instantiate(h).save_pretrained(directory)`` plus ``domain_weights.json`` (h by name)."""
        weights = self.check_weights(h).cpu()
        out = self.instantiate(weights).save_pretrained(directory)
        named = {n: float(w) for n, w in zip(self.config.names, weights) if w > 0}
        atomic_write_text(out / "domain_weights.json", json.dumps(named, indent=2) + "\n")
        return out
