"""The one training loop every stage runs: resumable, checkpointed, logged, with a progress bar.

A stage is its models, its optimizers and a `step(i) -> losses` function. Batches and noise are pure functions of
the step index (seeded by it), so a resumed run continues exactly where the interrupted one stopped, with no data
loader or RNG state to save.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

StepFn = Callable[[int], dict[str, float]]


class EMA(torch.nn.Module):
    """Exponential moving average of a module's weights: what a stage ships, as diffusion models usually do, since
    at a constant learning rate the last step's weights carry that step's noise. (On the session-4 teacher after
    13k steps it scored within noise of the raw weights: semantic 0.49 against 0.47, docs/training.md.)
    The decay warms up as `(1 + n) / (10 + n)`, so the average follows the model closely at first (also when a
    checkpoint from before the average existed is resumed)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.average = copy.deepcopy(model).requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        n = int(self.updates)
        weight = 1 - min(self.decay, (1 + n) / (10 + n))
        averaged = [p for p in self.average.parameters()]
        torch._foreach_lerp_(averaged, [p.detach() for p in model.parameters()], weight)
        self.updates += 1


def optimize(
    optimizer: torch.optim.Optimizer, loss: torch.Tensor, max_norm: float = 1.0
) -> None:
    """Backward, clip and step: clipping keeps the early, noisy steps of tiny models from blowing up."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


def generator(
    step: int, salt: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator seeded by the step index: what makes every step reproducible after a resume."""
    return torch.Generator(device).manual_seed(1_000_003 * salt + step)


class Run:
    """One stage's directory: `state.pt` (checkpoint), `log.jsonl` (losses), `final/` (its exported models)."""

    def __init__(self, root: Path, stage: str) -> None:
        self.dir = Path(root) / stage
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = self.dir / "state.pt"
        self.final = self.dir / "final"

    @property
    def done(self) -> bool:
        return self.final.is_dir()

    def train(
        self,
        steps: int,
        modules: dict[str, torch.nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        step: StepFn,
        checkpoint_every: int = 100,
        minutes: float | None = None,
    ) -> dict[str, float]:
        """Run `step` from the last checkpoint up to `steps`, or until `minutes` of wall time have passed (a
        time-boxed stage on a machine of unknown speed); returns the steps done and the mean losses of the last
        10% of steps run."""
        start = reached = self._resume(modules, optimizers)
        history: list[dict[str, float]] = []
        with (
            open(self.dir / "log.jsonl", "a") as log,
            tqdm(
                total=steps,
                initial=start,
                desc=self.dir.name,
                unit="step",
                dynamic_ncols=True,
            ) as bar,
        ):
            began = time.perf_counter()
            for i in range(start, steps):
                if minutes is not None and time.perf_counter() - began > 60 * minutes:
                    self._save(i, modules, optimizers)
                    tqdm.write(
                        f"{self.dir.name}: time box of {minutes} min reached at step {i}"
                    )
                    break
                for module in modules.values():
                    module.train()
                losses = step(i)
                reached = i + 1
                history.append(losses)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()})
                log.write(
                    json.dumps(
                        {"step": i, "seconds": round(time.perf_counter() - began, 2)}
                        | losses
                    )
                    + "\n"
                )
                if (i + 1) % checkpoint_every == 0 or i + 1 == steps:
                    log.flush()
                    self._save(i + 1, modules, optimizers)
        for module in modules.values():
            module.eval()
        recent = history[-max(1, len(history) // 10) :]
        means = (
            {k: sum(r[k] for r in recent) / len(recent) for k in recent[0]}
            if recent
            else {}
        )
        return {"steps_done": reached} | means

    def _save(self, step: int, modules: dict, optimizers: dict) -> None:
        state = {
            "step": step,
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        }
        torch.save(state, self.state.with_suffix(".tmp"))
        self.state.with_suffix(".tmp").replace(
            self.state
        )  # atomic: a kill mid-save keeps the last checkpoint

    def _resume(self, modules: dict, optimizers: dict) -> int:
        if not self.state.is_file():
            return 0
        state = torch.load(self.state, map_location="cpu", weights_only=True)
        for k, m in modules.items():
            if k not in state["modules"] and isinstance(m, EMA):
                continue  # an average new to the stage: its warm-up catches up with the resumed weights
            m.load_state_dict(state["modules"][k])
        for k, o in optimizers.items():
            # The checkpoint holds the optimizer's moments; the learning rate is the recipe's, so a run resumed
            # at another rate trains at that one.
            rates = [group["lr"] for group in o.param_groups]
            o.load_state_dict(state["optimizers"][k])
            for group, lr in zip(o.param_groups, rates, strict=True):
                group["lr"] = lr
        tqdm.write(f"{self.dir.name}: resuming at step {state['step']}")
        return state["step"]
