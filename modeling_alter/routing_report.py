"""The routing report of a trained ALTER model: per task and MTA module, the mean gate weight of every adapter and the
routing entropy (`RoutingStatistics`), their table, JSON and heatmap, and readable names of the MTA modules
(`mta_module_labels`).

[`AlterTrainer`] fills a `RoutingStatistics` during per-task evaluation and at the end of training
(`save_routing_report` writes `routing_stats.json` and `routing_heatmap.png`); any code can fill one from a model's
`routing_weights` / `routing_entropy` outputs:

```python
from modeling_alter.routing_report import RoutingStatistics, mta_module_labels

config = model.config
adapters = list(config.task_names) + [f"shared_{i}" for i in range(config.num_shared_adapters)]
stats = RoutingStatistics(config.task_names, mta_module_labels(model), adapters)
out = model(**batch, output_routing_weights=True)
stats.update(batch["task_ids"], out.routing_weights, out.routing_entropy)
stats.plot("routing_heatmap.png")
```

This file imports torch (and matplotlib when plotting); it does not go to the Hub.
"""

import logging
import math
import os
import textwrap

import torch


logger = logging.getLogger(__name__)

ROUTING_HEATMAP_NAME = "routing_heatmap.png"
ROUTING_STATS_NAME = "routing_stats.json"


def mta_module_labels(model) -> list[str]:
    """Short names of the model's MTA modules in `routing_weights` order, e.g. `enc0.ffn`, `dec1.cross_attn`."""
    kinds = {"AlterLayerSelfAttention": "self_attn", "AlterLayerCrossAttention": "cross_attn", "AlterLayerFF": "ffn"}
    labels = []
    for name in model.mta_modules():
        parts = name.split(".")
        if "layers" in parts:  # a decoder-only model: model.layers.{i}.mta.{ffn,self_attention}
            kind = "self_attn" if parts[-1] == "self_attention" else parts[-1]
            labels.append(f"dec{parts[parts.index('layers') + 1]}.{kind}")
            continue
        stack = "enc" if "encoder" in parts else "dec"
        block = parts[parts.index("block") + 1] if "block" in parts else "?"
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        labels.append(f"{stack}{block}.{kinds.get(type(parent).__name__, type(parent).__name__)}")
    return labels


class RoutingStatistics:
    """
    Accumulates, per task and MTA module, the mean gate weight of every adapter and the mean routing entropy, from
    the `routing_weights` / `routing_entropy` outputs of [`AlterForConditionalGeneration`] (one value per example:
    its mean over tokens).

    Args:
        task_names (`list[str]`): the model's `config.task_names` (rows, by task id).
        module_names (`list[str]`): one short name per MTA module, in the model's order (see `mta_module_labels`).
        adapter_names (`list[str]`): the task adapters then the shared adapters.
    """

    def __init__(self, task_names, module_names, adapter_names):
        self.task_names = list(task_names)
        self.module_names = list(module_names)
        self.adapter_names = list(adapter_names)
        num_tasks, num_modules, num_adapters = len(self.task_names), len(self.module_names), len(self.adapter_names)
        self.weight_sum = torch.zeros(num_tasks, num_modules, num_adapters, dtype=torch.float64)
        self.entropy_sum = torch.zeros(num_tasks, num_modules, dtype=torch.float64)
        self.count = torch.zeros(num_tasks, dtype=torch.float64)

    def update(self, task_ids: torch.Tensor, routing_weights: torch.Tensor, routing_entropy: torch.Tensor) -> None:
        """Adds a batch: `task_ids` [batch], `routing_weights` [batch, modules, adapters], `routing_entropy`
        [batch, modules]."""
        task_ids = task_ids.detach().long().cpu()
        self.weight_sum.index_add_(0, task_ids, routing_weights.detach().double().cpu())
        self.entropy_sum.index_add_(0, task_ids, routing_entropy.detach().double().cpu())
        self.count.index_add_(0, task_ids, torch.ones(task_ids.shape[0], dtype=torch.float64))

    @property
    def tasks_seen(self) -> list[int]:
        """Ids of the tasks with at least one example."""
        return [i for i, n in enumerate(self.count.tolist()) if n > 0]

    def mean_weights(self) -> torch.Tensor:
        """[tasks, modules, adapters] mean gate weights (NaN for tasks without examples)."""
        return self.weight_sum / self.count[:, None, None]

    def mean_entropy(self) -> torch.Tensor:
        """[tasks, modules] mean routing entropy in nats (NaN for tasks without examples)."""
        return self.entropy_sum / self.count[:, None]

    def summary(self, prefix: str) -> dict[str, float]:
        """Scalar metrics per task: mean entropy over modules, mean weight of its own adapter and of the shared ones."""
        weights, entropy = self.mean_weights(), self.mean_entropy()
        num_tasks = len(self.task_names)
        metrics = {}
        for task in self.tasks_seen:
            name = self.task_names[task]
            metrics[f"{prefix}_{name}_routing_entropy"] = float(entropy[task].mean())
            metrics[f"{prefix}_{name}_routing_own_adapter"] = float(weights[task, :, task].mean())
            if len(self.adapter_names) > num_tasks:
                metrics[f"{prefix}_{name}_routing_shared_adapters"] = float(weights[task, :, num_tasks:].sum(-1).mean())
        return metrics

    def to_dict(self) -> dict:
        """JSON-ready statistics: per task, per module, the mean weight of every adapter and the entropy."""
        weights, entropy = self.mean_weights(), self.mean_entropy()
        tasks = {}
        for task in self.tasks_seen:
            tasks[self.task_names[task]] = {
                "num_examples": int(self.count[task]),
                "modules": {
                    module: {
                        "mean_gate_weight": dict(zip(self.adapter_names, map(float, weights[task, m]))),
                        "entropy": float(entropy[task, m]),
                    }
                    for m, module in enumerate(self.module_names)
                },
            }
        return {"adapters": self.adapter_names, "modules": self.module_names, "tasks": tasks}

    def log_table(self, log: logging.Logger | None = None) -> None:
        """Logs (at INFO level, to `log`, default this module's logger) one line per task and module: entropy and the
        mean weight of every adapter. [`AlterTrainer`] passes its own logger (`modeling_alter.trainer`)."""
        weights, entropy = self.mean_weights(), self.mean_entropy()
        header = "task | module | entropy | " + " | ".join(self.adapter_names)
        lines = [header]
        for task in self.tasks_seen:
            for m, module in enumerate(self.module_names):
                values = " | ".join(f"{w:.3f}" for w in weights[task, m].tolist())
                lines.append(f"{self.task_names[task]} | {module} | {float(entropy[task, m]):.3f} | {values}")
        (log or logger).info("ALTER routing statistics (mean gate weight per adapter):\n" + "\n".join(lines))

    WEIGHT_LABEL = "mean adapter weight w_j (not a distribution)"
    WEIGHT_NOTE = (
        "Each cell: the mean weight w_j that adapter j gets on the task's tokens. Task adapters share a weight of 1 "
        "(one-hot on the own task, mixed with the gate in stage 2); shared adapters add their gate weight on top, "
        "so a row can sum to more than 1."
    )

    def plot(self, path: str | os.PathLike, title: str | None = None) -> None:
        """
        Saves a PNG heatmap (see `figure`).
        """
        import matplotlib.pyplot as plt

        figure = self.figure(title)
        figure.savefig(path, dpi=120, bbox_inches="tight")  # keeps the colour-bar label inside the picture
        plt.close(figure)

    def figure(self, title: str | None = None):
        """
        A matplotlib figure of three panels, rows = tasks:

        - left, **adapter weights**: the mean weight of every adapter over all MTA modules (`WEIGHT_NOTE` says why a
          row is not a distribution), so one look tells which adapters each task uses;
        - right, top, **weight beyond the task's own adapter**, per MTA module: the other tasks' adapters plus the
          shared ones, i.e. where in the network the tasks collaborate;
        - right, bottom, **routing entropy** per MTA module, in nats, on its own colour scale.

        Each cell prints its value (weights below 0.005 are left blank) while the panel has at most 16 modules;
        modules are named as a reader says them ("encoder block 0 · FFN", "decoder layer 3 · MLP"). The per-module
        weights of every adapter are in `to_dict()` (`routing_stats.json`). Close the figure with
        `matplotlib.pyplot.close`.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        tasks = self.tasks_seen
        if not tasks:
            raise ValueError("No routing statistics to plot: no example was seen.")
        task_labels = [self.task_names[t] for t in tasks]
        weights = self.mean_weights()[tasks].numpy()  # [tasks, modules, adapters]
        entropy = self.mean_entropy()[tasks].numpy()  # [tasks, modules]
        num_tasks, num_modules, num_adapters = weights.shape
        own = np.stack([weights[row, :, task] if task < num_adapters else np.zeros(num_modules)
                        for row, task in enumerate(tasks)])  # [tasks, modules]
        beyond_own = weights.sum(-1) - own
        mean_weights = weights.mean(1)  # [tasks, adapters]
        module_labels = readable_module_names(self.module_names)

        annotate_modules = num_modules <= 16
        cell_in = 0.62 if annotate_modules else 0.32
        left_width = 1.0 + 0.62 * num_adapters
        right_width = 1.0 + cell_in * num_modules
        label_in = 0.09 * max(len(label) for label in task_labels) + 0.4
        compact = not annotate_modules and len({label.split(" · ")[-1] for label in module_labels}) == 1
        longest = max(len(label) for label in [*self.adapter_names, *([] if compact else module_labels)])
        height = 2 * (0.9 + 0.34 * num_tasks) + 0.06 * longest + 1.2  # tick labels at 45 degrees below the panels
        figure = plt.figure(figsize=(label_in + left_width + label_in + right_width + 1.6, height),
                            layout="constrained")
        grid = figure.add_gridspec(2, 2, width_ratios=[left_width, right_width])
        summary = figure.add_subplot(grid[:, 0])
        collaboration = figure.add_subplot(grid[0, 1])
        spread = figure.add_subplot(grid[1, 1], sharex=collaboration)

        image = summary.imshow(mean_weights, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        summary.set_title(f"Adapter weights, mean over the {num_modules} MTA modules", fontsize=10)
        summary.set_xticks(range(num_adapters), self.adapter_names, rotation=45, ha="right", fontsize=9)
        summary.set_yticks(range(num_tasks), task_labels, fontsize=9)
        summary.set_xlabel("adapter", fontsize=9)
        summary.set_ylabel("task", fontsize=9)
        _annotate(summary, mean_weights, vmax=1.0, blank_below=0.005, fontsize=8)
        figure.colorbar(image, ax=summary, shrink=0.6, label=self.WEIGHT_LABEL)

        top = max(float(np.nanmax(beyond_own)), 0.05)
        image = collaboration.imshow(beyond_own, vmin=0.0, vmax=top, cmap="viridis", aspect="auto")
        collaboration.set_title("Weight beyond the task's own adapter (other tasks' + shared), per module",
                                fontsize=10)
        collaboration.set_yticks(range(num_tasks), task_labels, fontsize=9)
        collaboration.tick_params(axis="x", labelbottom=False)
        if annotate_modules:
            _annotate(collaboration, beyond_own, vmax=top, blank_below=0.005, fontsize=8)
        figure.colorbar(image, ax=collaboration, shrink=0.9, label="weight")

        top = max(float(np.nanmax(entropy)), 0.05)
        image = spread.imshow(entropy, vmin=0.0, vmax=top, cmap="magma", aspect="auto")
        spread.set_title("Routing entropy per module (nats; 0 = one adapter)", fontsize=10)
        units = [label.split(" · ")[0].rsplit(" ", 1) for label in module_labels]  # ["decoder layer", "3"]
        groups = {f"{unit[0]} · {label.split(' · ')[-1]}" for unit, label in zip(units, module_labels)}
        if compact and len(groups) == 1 and all(" · " in label for label in module_labels):
            # Many modules of one kind (e.g. the MLP of every decoder layer): the index says it all.
            spread.set_xticks(range(num_modules), [unit[-1] for unit in units], fontsize=8)
            spread.set_xlabel(f"MTA module: {groups.pop().replace(' · ', ' N · ')}", fontsize=9)
        else:
            spread.set_xticks(range(num_modules), module_labels, rotation=45, ha="right", fontsize=9)
            spread.set_xlabel("MTA module", fontsize=9)
        spread.set_yticks(range(num_tasks), task_labels, fontsize=9)
        if annotate_modules:
            _annotate(spread, entropy, vmax=top, blank_below=None, fontsize=8)
        figure.colorbar(image, ax=spread, shrink=0.9, label="entropy (nats)")

        if title:
            figure.suptitle(title, fontsize=12)
        width = figure.get_size_inches()[0]
        figure.supxlabel("\n".join(textwrap.wrap(self.WEIGHT_NOTE, width=int(width * 13))), fontsize=8)
        return figure


def readable_module_names(labels: list[str]) -> list[str]:
    """Names of MTA modules as a reader says them, from the short labels of `mta_module_labels`: `enc0.ffn` ->
    "encoder block 0 · FFN", `dec1.cross_attn` -> "decoder block 1 · cross-attention" for an encoder-decoder (labels
    with an `enc` module), `dec3.ffn` -> "decoder layer 3 · MLP" for a decoder-only model. Unknown labels pass
    through."""
    encoder_decoder = any(label.startswith("enc") for label in labels)
    kinds = {"ffn": "FFN" if encoder_decoder else "MLP", "self_attn": "self-attention" if encoder_decoder else
             "attention", "cross_attn": "cross-attention"}
    names = []
    for label in labels:
        stack, _, kind = label.partition(".")
        prefix = "enc" if stack.startswith("enc") else "dec" if stack.startswith("dec") else None
        index = stack[len(prefix):] if prefix else ""
        if prefix is None or not index.isdigit():
            names.append(label)
            continue
        unit = "block" if encoder_decoder else "layer"
        names.append(f"{'encoder' if prefix == 'enc' else 'decoder'} {unit} {index} · {kinds.get(kind, kind)}")
    return names


def _annotate(axis, values, vmax: float, blank_below: float | None, fontsize: int) -> None:
    """Prints each cell's value (2 decimals) in a colour readable on the colour map."""
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            value = float(values[i, j])
            if value != value or (blank_below is not None and abs(value) < blank_below):
                continue
            color = "black" if value > 0.6 * vmax else "white"
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=fontsize, color=color)

__all__ = [
    "ROUTING_HEATMAP_NAME", "ROUTING_STATS_NAME", "RoutingStatistics", "mta_module_labels", "readable_module_names",
]
