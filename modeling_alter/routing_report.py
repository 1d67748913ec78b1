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
        A matplotlib figure: one panel per MTA module (y axis: task, x axis: adapter, colour and number: the mean
        weight of the adapter, `WEIGHT_NOTE` says why rows are not distributions), and a last panel with the routing
        entropy per task and module. Close it with `matplotlib.pyplot.close`.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tasks = self.tasks_seen
        if not tasks:
            raise ValueError("No routing statistics to plot: no example was seen.")
        task_labels = [self.task_names[t] for t in tasks]
        weights = self.mean_weights()[tasks].numpy()
        entropy = self.mean_entropy()[tasks].numpy()
        num_panels = len(self.module_names) + 1
        columns = min(4, num_panels)
        rows = math.ceil(num_panels / columns)
        width = columns * max(2.6, 0.8 + 0.32 * len(self.adapter_names)) + 1.6
        height = rows * max(2.2, 0.9 + 0.3 * len(tasks)) + 0.6
        figure, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False, layout="constrained")
        annotate = len(tasks) * len(self.adapter_names) <= 120
        for m, module in enumerate(self.module_names):
            axis = axes[m // columns][m % columns]
            image = axis.imshow(weights[:, m, :], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            axis.set_title(module, fontsize=9)
            axis.set_xticks(range(len(self.adapter_names)), self.adapter_names, rotation=60, ha="right", fontsize=7)
            axis.set_yticks(range(len(tasks)), task_labels if m % columns == 0 else [], fontsize=7)
            axis.set_xlabel("adapter", fontsize=8)
            axis.set_ylabel("task" if m % columns == 0 else "", fontsize=8)
            if annotate:
                for i in range(len(tasks)):
                    for j in range(len(self.adapter_names)):
                        value = weights[i, m, j]
                        color = "black" if value > 0.6 else "white"
                        axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=5, color=color)
        figure.colorbar(image, ax=[axes[m // columns][m % columns] for m in range(len(self.module_names))],
                        shrink=0.8, label=self.WEIGHT_LABEL)
        axis = axes[(num_panels - 1) // columns][(num_panels - 1) % columns]
        image = axis.imshow(entropy, vmin=0.0, vmax=max(math.log(len(self.adapter_names)), 1e-6), cmap="magma",
                            aspect="auto")
        axis.set_title("routing entropy (nats)", fontsize=9)
        axis.set_xticks(range(len(self.module_names)), self.module_names, rotation=60, ha="right", fontsize=7)
        axis.set_yticks(range(len(tasks)), task_labels, fontsize=7)
        axis.set_xlabel("MTA module", fontsize=8)
        axis.set_ylabel("task", fontsize=8)
        figure.colorbar(image, ax=axis, shrink=0.8, label="entropy of w (nats)")
        for extra in range(num_panels, rows * columns):
            axes[extra // columns][extra % columns].axis("off")
        if title:
            figure.suptitle(title)
        figure.supxlabel("\n".join(textwrap.wrap(self.WEIGHT_NOTE, width=int(width * 14))), fontsize=7)
        return figure


__all__ = ["ROUTING_HEATMAP_NAME", "ROUTING_STATS_NAME", "RoutingStatistics", "mta_module_labels"]
