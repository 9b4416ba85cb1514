"""Throughput, TFLOP/s and MFU from analytic FLOPs, and the run's metric sinks (JSONL + TensorBoard).

MFU is useful model FLOPs per second (nemojax.model.flops.flops_per_token: forward + backward,
no remat recomputation) divided by the devices' peak dense bf16 FLOP/s, the convention of the
Nemotron-4 report (989 TFLOP/s per H100) and of MaxText. Peaks are looked up from
`jax.Device.device_kind`; on CPU there is no meaningful peak, so MFU is null unless the config
gives `peak_tflops`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax

from nemojax.config import ModelConfig

# Peak dense bf16 FLOP/s per device, matched as a case-insensitive substring of device_kind.
# Order matters: more specific names first ("v5 lite" before "v5").
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("gh200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l4", 121e12),
    ("v6 lite", 918e12),  # Trillium / v6e
    ("v6e", 918e12),
    ("v5 lite", 197e12),  # v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("tpu v3", 123e12),
)


def peak_flops_per_device(device: jax.Device | None = None, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device, from the config override (TFLOP/s) or the device kind; None if unknown."""
    if override_tflops and override_tflops > 0:
        return float(override_tflops) * 1e12
    device = device or jax.devices()[0]
    kind = str(getattr(device, "device_kind", "")).lower()
    if device.platform == "cpu":
        return None
    for key, peak in PEAK_FLOPS:
        if key in kind:
            return peak
    return None


class ThroughputMeter:
    """Turns (tokens, seconds) over a logging interval into tokens/s, TFLOP/s per device and MFU."""

    def __init__(self, model: ModelConfig, seq_len: int, *, num_devices: int,
                 peak_flops: float | None):
        from nemojax.model.flops import flops_per_token

        self.flops_per_token = flops_per_token(model, seq_len)["train"]
        self.num_devices = num_devices
        self.peak_flops = peak_flops

    def __call__(self, tokens: float, seconds: float) -> dict[str, float | None]:
        if seconds <= 0:
            return {"tokens_per_sec": None, "tflops_per_device": None, "mfu": None}
        tps = tokens / seconds
        flops_dev = tps * self.flops_per_token / self.num_devices
        return {
            "tokens_per_sec": tps,
            "tflops_per_device": flops_dev / 1e12,
            "mfu": (flops_dev / self.peak_flops) if self.peak_flops else None,
        }


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan" / "inf": valid JSON, still readable
    return v


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._fh = self.path.open("a")
        self._tb = None
        if tensorboard and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            # purge_step drops events a crashed run wrote past the checkpoint we resume from.
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        """A run killed after its last checkpoint logged steps that will be redone: drop them so
        the log has each step once, with the values of the run that continued."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a hard kill
            if int(rec.get("step", 0)) <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        rec = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def format_progress(step: int, total: int, m: dict[str, Any]) -> str:
    """One console line: step, loss, lr, tokens/s, MFU (and val loss when present)."""
    parts = [f"step {step:>6d}/{total}"]
    if "loss" in m:
        parts.append(f"loss {m['loss']:.4f}")
    if "val_loss" in m:
        parts.append(f"val_loss {m['val_loss']:.4f}")
    if "learning_rate" in m:
        parts.append(f"lr {m['learning_rate']:.3e}")
    if m.get("grad_norm") is not None:
        parts.append(f"gnorm {m['grad_norm']:.3f}")
    if m.get("tokens_per_sec") is not None:
        parts.append(f"{m['tokens_per_sec']:,.0f} tok/s")
    if m.get("tflops_per_device") is not None:
        parts.append(f"{m['tflops_per_device']:.3f} TFLOP/s/dev")
    mfu = m.get("mfu")
    parts.append(f"MFU {mfu * 100:.1f}%" if mfu is not None else "MFU n/a")
    return " | ".join(parts)
