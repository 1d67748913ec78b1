"""The model card (`README.md`): built with `huggingface_hub.ModelCard`/`ModelCardData`, and verified by `check`.

Metadata: `library_name: transformers`, `pipeline_tag: text2text-generation`, tags (`alter`,
`mixture-of-task-adapters`, `custom_code`, the domain), `base_model`, `datasets`, `license`, `language`, a
`model-index` with the per-task results of the published stage, and an `alter` block (`task_names`, `stage`,
`domain`, `parameters`, `revision_pin`) that `check` compares with the model it loads. Body: the task list with ids, a
usage snippet with `trust_remote_code=True` and a pinned `revision`, the per-task evaluation table for stage 1 and
stage 2, the routing picture when there is one, and the parameter counts per stage.
"""

import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .errors import PrepareError
from .families import family_of


REQUIRED_TAGS = ("alter", "mixture-of-task-adapters", "custom_code")
LIBRARY_NAME = "transformers"
PIPELINE_TAG = "text2text-generation"
PAPER_URL = "https://arxiv.org/abs/2309.11042"
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_ID_PATTERN = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)")


def check_repo_id(repo_id) -> str:
    """Returns `repo_id` if it is a `namespace/name` Hub id, else raises `PrepareError` naming it."""
    if not isinstance(repo_id, str) or not REPO_ID_PATTERN.match(repo_id) or ".." in repo_id or len(repo_id) > 96:
        raise PrepareError(
            f"repository id {repo_id!r} is not valid: expected 'namespace/name', e.g. 'my-org/alter-medical'"
        )
    return repo_id


def count_parameters(model) -> dict[str, int]:
    """Total parameters (tied weights once) and the parameters that train in stage 1 and in stage 2."""
    parameters = dict(model.named_parameters())
    return {
        "total": sum(p.numel() for p in parameters.values()),
        "stage1_trainable": sum(parameters[name].numel() for name in model.trainable_parameter_names(1)),
        "stage2_trainable": sum(parameters[name].numel() for name in model.trainable_parameter_names(2)),
    }


def domain_tag(domain) -> str:
    """The Hub tag of a domain: lowercase words joined by `-` (`"Clinical notes"` -> `"clinical-notes"`)."""
    tag = re.sub(r"[^a-z0-9]+", "-", str(domain).lower()).strip("-")
    if not tag:
        raise PrepareError(f"domain {domain!r} is not valid: give a word such as 'medical' or 'legal'")
    return tag


def build_model_card(
    config,
    *,
    repo_id,
    domain,
    parameters,
    results=None,
    routing_image=None,
    base_model=None,
    datasets=(),
    task_datasets=None,
    license="apache-2.0",
    language=None,
    revision_pin="main",
) -> ModelCard:
    """
    Builds the card of an ALTER model from its `config` (an `AlterConfig`), `parameters` (`count_parameters`),
    `results` (`EvalResults` or None) and `routing_image` (the picture's path relative to the folder, or None).
    `task_datasets` maps a task to the Hub dataset id its model-index entry names; it defaults to the only entry of
    `datasets` when there is one, else to the task name.
    """
    check_repo_id(repo_id)
    task_names = list(config.task_names)
    tag = domain_tag(domain)
    for dataset in datasets:
        if not HUB_ID_PATTERN.match(dataset):
            raise PrepareError(f"dataset id {dataset!r} is not a Hub dataset id ('name' or 'namespace/name')")
    if base_model is not None and not HUB_ID_PATTERN.match(base_model):
        raise PrepareError(f"base model {base_model!r} is not a Hub model id ('namespace/name'); local paths are not")
    if not revision_pin or any(c.isspace() or c in "\"'\\" for c in revision_pin):
        raise PrepareError(f"revision pin {revision_pin!r} is not a valid git revision (a branch, tag or commit sha)")
    task_datasets = dict(task_datasets or {})
    unknown = sorted(set(task_datasets) - set(task_names))
    if unknown:
        raise PrepareError(f"task dataset given for unknown task(s) {unknown}; the model's tasks are {task_names}")

    results = results or None
    published_stage = None
    eval_results = None
    if results:
        published_stage = config.stage if config.stage in results.stages() else results.stages()[-1]
        default_dataset = datasets[0] if len(datasets) == 1 else None
        eval_results = [
            EvalResult(
                task_type=(family_of(getattr(config, "model_type", "alter")) or family_of("alter")).pipeline_tag,
                task_name=task,
                dataset_type=task_datasets.get(task) or default_dataset or task,
                dataset_name=task,
                dataset_config=task,  # part of the model-index grouping key: one entry per task
                metric_type=metric,
                metric_name=f"{metric} (stage {published_stage})",
                metric_value=value,
            )
            for task, metric in results.rows(task_names)
            if (value := results.get(published_stage, task, metric)) is not None
        ]
    family = family_of(getattr(config, "model_type", "alter")) or family_of("alter")
    card_data = ModelCardData(
        base_model=base_model,
        datasets=list(datasets) or None,
        language=language or None,
        library_name=LIBRARY_NAME,
        license=license,
        pipeline_tag=family.pipeline_tag,
        tags=[*REQUIRED_TAGS, tag],
        model_name=repo_id.split("/", 1)[1],
        eval_results=eval_results or None,
        alter={
            "task_names": task_names,
            "stage": config.stage,
            "domain": tag,
            "parameters": dict(parameters),
            "revision_pin": revision_pin,
        },
    )
    body = _card_body(
        config,
        repo_id,
        domain,
        parameters,
        results,
        published_stage,
        routing_image,
        base_model,
        datasets,
        revision_pin,
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _card_body(
    config, repo_id, domain, parameters, results, published_stage, routing_image, base_model, datasets, revision_pin
):
    task_names = list(config.task_names)
    name = repo_id.split("/", 1)[1]
    example_task = task_names[0]
    family = family_of(getattr(config, "model_type", "alter")) or family_of("alter")
    causal = family.auto_class == "AutoModelForCausalLM"
    code_files = ", ".join(f"`{file}`" for file in family.code_files)
    pin_comment = (
        "  # a branch: replace it with a reviewed commit sha to pin the code you run"
        if not re.fullmatch(r"[0-9a-f]{40}", revision_pin)
        else ""
    )
    lines = [
        f"# {name}",
        "",
        f"`{name}` is an [ALTER]({PAPER_URL}) multi-task model for the **{domain}** domain: "
        f"{family.architecture(config)} whose blocks carry a Mixture-of-Task-Adapters: one adapter per task plus "
        f"{config.num_shared_adapters} shared adapter(s), bottleneck {config.adapter_dim}. Stage 1 trains each task's "
        "own adapter (task selector); stage 2 trains a token-level gate that mixes all adapters (collaboration). "
        f"This checkpoint is in stage {config.stage}.",
        "",
        "## Tasks",
        "",
        "Give every example its task with `task_ids=model.task_ids([...])`; a task's id is its position in "
        "`config.task_names`.",
        "",
        "| id | task |",
        "|---:|---|",
        *(f"| {index} | `{task}` |" for index, task in enumerate(task_names)),
        "",
        "## Usage",
        "",
        f"The model code ({code_files}) ships in this repository and runs on "
        "your machine, hence `trust_remote_code=True`; `revision` pins the version of that code you load.",
        "",
        "```python",
        f"from transformers import {family.auto_class}, AutoTokenizer",
        "",
        f'revision = "{revision_pin}"{pin_comment}',
        f'model = {family.auto_class}.from_pretrained("{repo_id}", trust_remote_code=True, revision=revision)',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True, revision=revision)',
        "",
        *(['tokenizer.padding_side = "left"  # a decoder-only model continues the prompt',
           'batch = tokenizer(["your input text\\n"], return_tensors="pt")']
          if causal else ['batch = tokenizer(["your input text"], return_tensors="pt")']),
        f'task_ids = model.task_ids(["{example_task}"])',
        "outputs = model.generate(**batch, task_ids=task_ids, num_beams=4, max_new_tokens=64)",
        *(['print(tokenizer.batch_decode(outputs[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))']
          if causal else ["print(tokenizer.batch_decode(outputs, skip_special_tokens=True))"]),
        "```",
        *(["", "Or through `pipeline(\"text-generation\", model=..., trust_remote_code=True)`, passing "
           f"`task_ids=model.task_ids([\"{example_task}\"])` with each single prompt."] if causal else []),
        "",
        "## Evaluation",
        "",
    ]
    if results:
        stages = results.stages()
        lines += [
            f"Per-task results of the training run ({', '.join(f'`{s}`' for s in results.sources)}); the "
            f"`model-index` metadata reports stage {published_stage}.",
            "",
            "| id | task | metric | " + " | ".join(f"stage {stage}" for stage in stages) + " |",
            "|---:|---|---|" + "---:|" * len(stages),
        ]
        for task, metric in results.rows(task_names):
            values = [results.get(stage, task, metric) for stage in stages]
            cells = " | ".join("–" if value is None else f"{value:.4f}" for value in values)
            lines.append(f"| {task_names.index(task)} | `{task}` | {metric} | {cells} |")
    else:
        lines.append("No evaluation results were recorded for this checkpoint.")
    lines.append("")
    if routing_image:
        lines += [
            "## Routing",
            "",
            f"![Routing heatmap of the stage-2 gate]({routing_image})",
            "",
            "Routing statistics recorded by the training run: how the stage-2 gate weighs the task and shared "
            "adapters for each task and layer.",
            "",
        ]
    base_model_line = (
        f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else "none (trained from scratch)"
    )
    lines += [
        "## Parameters",
        "",
        "| | parameters |",
        "|---|---:|",
        f"| total | {parameters['total']:,} |",
        f"| trainable in stage 1 (task adapters{' and backbone' if config.stage1_train_backbone else ''}) "
        f"| {parameters['stage1_trainable']:,} |",
        f"| trainable in stage 2 (gate, task embeddings, shared adapters) | {parameters['stage2_trainable']:,} |",
        "",
        "## Training",
        "",
        f"- Base model: {base_model_line}",
        f"- Datasets: {', '.join(f'`{d}`' for d in datasets) if datasets else 'not published'}",
        f"- MTA: placement {', '.join(config.mta_placement)}; router top-k "
        f"{config.router_top_k if config.router_top_k is not None else 'dense'}; adapter activation "
        f"{config.adapter_activation}",
        "",
    ]
    return "\n".join(lines)


def verify_model_card(text, folder, config) -> tuple[list[str], list[str]]:
    """
    Checks a card's metadata and body against the folder and its `config.json` (a dict). Returns `(problems,
    warnings)`; problems name the metadata key or card section at fault.
    """
    problems, warnings = [], []
    try:
        card = ModelCard(text)
    except Exception as error:  # noqa: BLE001 - any parse failure is a card problem
        return [f"README.md: the metadata block does not parse: {error}"], warnings
    data = card.data
    task_names = list(config.get("task_names") or [])
    if data.library_name != LIBRARY_NAME:
        problems.append(f"README.md metadata: library_name is {data.library_name!r}, expected {LIBRARY_NAME!r}")
    family = family_of(config.get("model_type")) or family_of("alter")
    if data.pipeline_tag != family.pipeline_tag:
        problems.append(
            f"README.md metadata: pipeline_tag is {data.pipeline_tag!r}, expected {family.pipeline_tag!r}"
        )
    tags = list(data.tags or [])
    missing = [tag for tag in REQUIRED_TAGS if tag not in tags]
    if missing:
        problems.append(f"README.md metadata: tags {tags} lack {missing}")
    for key in ("base_model", "datasets"):
        value = getattr(data, key)
        values = [value] if isinstance(value, str) else list(value or [])
        bad = [v for v in values if not isinstance(v, str) or not HUB_ID_PATTERN.match(v)]
        if bad:
            problems.append(f"README.md metadata: {key} {bad} are not Hub ids")
    alter = data.to_dict().get("alter")
    if not isinstance(alter, dict):
        problems.append("README.md metadata: the 'alter' block (task_names, stage, parameters) is missing")
        alter = {}
    else:
        if alter.get("task_names") != task_names:
            problems.append(
                f"README.md metadata: alter.task_names {alter.get('task_names')} differ from config.json's "
                f"{task_names}"
            )
        if alter.get("stage") != config.get("stage"):
            problems.append(
                f"README.md metadata: alter.stage {alter.get('stage')} differs from config.json's "
                f"{config.get('stage')}"
            )
        if alter.get("domain") not in tags:
            problems.append(f"README.md metadata: the domain tag {alter.get('domain')!r} is not among the tags {tags}")
        counts = alter.get("parameters")
        if not isinstance(counts, dict) or not all(
            isinstance(counts.get(k), int) for k in ("total", "stage1_trainable", "stage2_trainable")
        ):
            problems.append(
                "README.md metadata: alter.parameters needs integer total, stage1_trainable, stage2_trainable"
            )
    if data.eval_results:
        for result in data.eval_results:
            if result.task_name not in task_names:
                problems.append(f"README.md model-index: task {result.task_name!r} is not one of {task_names}")
            if isinstance(result.metric_value, bool) or not isinstance(result.metric_value, (int, float)):
                problems.append(
                    f"README.md model-index: {result.task_name}/{result.metric_type} value {result.metric_value!r} "
                    "is not a number"
                )
    else:
        warnings.append("README.md has no model-index: the card reports no evaluation results")

    body = card.text
    if "trust_remote_code=True" not in body:
        problems.append("README.md usage snippet: trust_remote_code=True is missing")
    pin = alter.get("revision_pin")
    if not pin or f'revision = "{pin}"' not in body or "revision=revision" not in body:
        problems.append(
            "README.md usage snippet: from_pretrained(..., revision=...) with the pinned revision is missing"
        )
    lines = set(body.splitlines())
    for index, task in enumerate(task_names):
        if f"| {index} | `{task}` |" not in lines:
            problems.append(f"README.md task list: task {task!r} with id {index} is missing")
    for target in IMAGE_LINK.findall(body):
        if re.match(r"^[a-z]+://", target):
            continue
        path = Path(folder) / target
        if target.startswith(("/", "\\")) or ".." in Path(target).parts or not path.is_file():
            problems.append(f"README.md picture {target!r}: not a file inside the folder")
    return problems, warnings


def card_repo_id(text):
    """The repository id the card's usage snippet loads, or None."""
    match = re.search(r'AutoModelFor(?:Seq2SeqLM|CausalLM)\.from_pretrained\("([^"]+)"', text)
    return match.group(1) if match else None


__all__ = [
    "PIPELINE_TAG",
    "REQUIRED_TAGS",
    "build_model_card",
    "card_repo_id",
    "check_repo_id",
    "count_parameters",
    "domain_tag",
    "verify_model_card",
]
