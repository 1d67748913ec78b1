import pytest

from modeling_alter.metrics import METRICS, accuracy, compute_metric, exact_match, normalize_text, rouge_l, token_f1


def test_normalize_text():
    assert normalize_text("  The  Cat\n sat\t") == "the cat sat"
    assert normalize_text("") == ""


def test_exact_match_and_accuracy():
    predictions = ["Positive", " the  cat ", "dog", "sci/tech"]
    references = ["positive", "The Cat", "cat", "Sci/Tech"]
    assert exact_match(predictions, references) == 0.75
    assert accuracy(predictions, references) == 0.75
    assert exact_match(["a"], ["a."]) == 0.0  # punctuation is kept


def test_token_f1():
    assert token_f1(["a b c"], ["a b d"]) == pytest.approx(2 / 3)
    assert token_f1(["a a b"], ["a b b"]) == pytest.approx(2 / 3)  # bag of tokens, counts clipped
    assert token_f1(["the cat"], ["The  cat"]) == 1.0
    assert token_f1(["x"], ["y"]) == 0.0
    assert token_f1(["", ""], ["", "a"]) == 0.5
    # precision 1/1, recall 1/4 -> F1 0.4; averaged with a perfect match.
    assert token_f1(["a", "b c"], ["a b c d", "b c"]) == pytest.approx((0.4 + 1.0) / 2)


def test_rouge_l():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == 1.0
    assert rouge_l(["x y"], ["a b"]) == 0.0
    # LCS "a c" of length 2: precision 2/3, recall 2/4 -> F = 4/7.
    assert rouge_l(["a b c"], ["a x c y"]) == pytest.approx(4 / 7)
    assert rouge_l(["The CAT"], ["the cat"]) == 1.0


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metrics_are_in_unit_interval(name):
    predictions = ["a b", "c", "", "positive", "d e f"]
    references = ["a b", "c d", "e", "negative", "f e d"]
    value = compute_metric(name, predictions, references)
    assert 0.0 <= value <= 1.0
    assert compute_metric(name, references, references) == 1.0


def test_compute_metric_dispatch_and_errors():
    assert set(METRICS) == {"exact_match", "accuracy", "token_f1", "rouge_l"}
    assert compute_metric("token_f1", ["a b c"], ["a b d"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"Unknown metric 'bleu'; known metrics: \['accuracy', 'exact_match'"):
        compute_metric("bleu", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metric("exact_match", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="zero examples"):
        compute_metric("rouge_l", [], [])
    with pytest.raises(ValueError, match=r"references\[1\] must be a string, got NoneType"):
        token_f1(["a", "b"], ["a", None])
    with pytest.raises(ValueError, match="single string"):
        exact_match("abc", ["abc"])
