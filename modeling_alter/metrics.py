"""Offline generation metrics for multi-task evaluation.

Every metric has the signature `metric(predictions: list[str], references: list[str]) -> float`, returns the
mean over examples, in [0, 1], and compares texts after `normalize_text`: leading and trailing whitespace
stripped, lowercased, and runs of whitespace collapsed to a single space. Nothing is downloaded.
"""

from collections import Counter
from collections.abc import Callable, Sequence

from rouge_score import rouge_scorer


def normalize_text(text: str) -> str:
    """Strip, lowercase and collapse whitespace: `"  The  Cat\\n"` -> `"the cat"`."""
    return " ".join(text.lower().split())


def _check_inputs(predictions: Sequence[str], references: Sequence[str]) -> None:
    for name, texts in (("predictions", predictions), ("references", references)):
        if isinstance(texts, str):
            raise ValueError(f"{name} must be a list of strings, got a single string {texts!r}.")
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(references)} references; they must pair up one to one."
        )
    if len(predictions) == 0:
        raise ValueError("Cannot compute a metric on zero examples.")
    for name, texts in (("predictions", predictions), ("references", references)):
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"{name}[{index}] must be a string, got {type(text).__name__} ({text!r}).")


def _mean_exact(predictions: Sequence[str], references: Sequence[str]) -> float:
    _check_inputs(predictions, references)
    hits = sum(normalize_text(p) == normalize_text(r) for p, r in zip(predictions, references))
    return hits / len(predictions)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after normalisation."""
    return _mean_exact(predictions, references)


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Classification accuracy: the fraction of predicted labels equal to the reference label after normalisation."""
    return _mean_exact(predictions, references)


def _f1(prediction: str, reference: str) -> float:
    prediction_tokens = normalize_text(prediction).split()
    reference_tokens = normalize_text(reference).split()
    if not prediction_tokens or not reference_tokens:
        return float(prediction_tokens == reference_tokens)
    overlap = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """SQuAD-style token F1: harmonic mean of the bag-of-whitespace-tokens precision and recall, averaged.

    Two empty texts score 1; an empty text against a non-empty one scores 0.
    """
    _check_inputs(predictions, references)
    return sum(_f1(p, r) for p, r in zip(predictions, references)) / len(predictions)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence) from the `rouge_score` package, without stemming."""
    _check_inputs(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = sum(
        scorer.score(normalize_text(r), normalize_text(p))["rougeL"].fmeasure for p, r in zip(predictions, references)
    )
    return total / len(predictions)


METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match,
    "accuracy": accuracy,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
}


def compute_metric(name: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """Compute the metric called `name` (a key of `METRICS`) on paired predictions and references."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; known metrics: {sorted(METRICS)}.")
    return METRICS[name](predictions, references)
