"""GQA / TextVQA scoring. Expected normalisations are derived by hand from the official EvalAI (m4c) rules."""
import random

import numpy as np
import pytest

from svdprune_jax.evaluation.vqa_metrics import gqa_score, normalize_gqa, normalize_textvqa, textvqa_score


@pytest.mark.parametrize("answer, expected", [
    ("Two dogs.", "2 dogs"),          # lower case, final period dropped, number word -> digit
    ("none", "0"), ("ZERO", "0"), ("ten", "10"), ("eleven", "eleven"),  # only none/zero..ten are mapped
    ("the cat", "cat"), ("A cat", "cat"), ("an apple", "apple"), ("the", ""),  # articles are whole words only
    ("theater", "theater"), ("anna", "anna"),
    ("dont", "don't"), ("youre", "you're"), ("don't", "don't"), ("oclock", "o'clock"), ("twas", "'twas"),
    ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"), ("couldntve", "couldntve"),  # one apostrophe only
    ("im", "im"), ("ive", "ive"),     # the official I'm / I've keys are capitalised and never match
    ("somebody'd", "somebodyd"),      # the official table's reversed entry
    ("dog's", "dog 's"), ("it's", "it 's"),  # "'s" is split off
    ("3.5", "3.5"), ("3.5.", "3.5"), (".5", ".5"), ("e.g.", "eg"), ("v1.0", "v1.0"),  # a period before a digit stays
    ("1,000", "1000"), ("red, blue", "red blue"), ("red,blue", "redblue"),  # commas vanish without a space
    ("what?", "what"), ("yes!", "yes"),
    ("t-shirt", "t shirt"), ("Coca-Cola", "coca cola"),  # punctuation between letters becomes a space...
    ("e-mail - x", "email x"),        # ...unless that mark touches a space somewhere: then it is deleted everywhere
    ("hello (world)", "hello world"), ("1/2", "1 2"), ("x_y", "x y"),
    ("a/b", "b"),                    # "a b", and then "a" is an article
    ("12:30", "12:30"), ("$5", "$5"), ("50%", "50%"), ("#1", "#1"),  # not in the official punctuation list
    ("  Big \t red\nball ", "big red ball"),
    ("." * 40, "." * 8),              # the official call removes at most 32 periods (re.UNICODE lands in `count`)
])
def test_normalize_textvqa(answer, expected):
    assert normalize_textvqa(answer) == expected


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_textvqa_score_hand_made(matches, expected):
    # k of 10 humans said "yes": leaving out one of them gives (k-1)/3, leaving out another gives k/3 (capped at 1)
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    assert textvqa_score("yes", answers) == pytest.approx(expected, abs=1e-12)


def test_textvqa_score_uses_normalisation():
    answers = ["two"] * 2 + ["2"] + ["The T-shirt."] * 3 + ["tshirt"] * 4
    assert textvqa_score("2", answers) == pytest.approx(0.9)
    assert textvqa_score("t shirt", answers) == pytest.approx(0.9)
    assert textvqa_score("tshirt", answers) == pytest.approx(1.0)
    assert textvqa_score("shirt", answers) == 0.0


def test_textvqa_score_matches_numpy_definition():
    # float64 NumPy: mean over the 10 leave-one-out subsets of min(1, matches in the other 9 / 3)
    pool = ["yes", "no", "2", "two", "red", "Red.", "stop sign", "the stop sign"]
    rng = random.Random(0)
    for _ in range(300):
        answers = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(pool + ["blue"])
        hit = np.array([normalize_textvqa(a) == normalize_textvqa(pred) for a in answers], np.float64)
        others = hit.sum() - hit
        assert textvqa_score(pred, answers) == pytest.approx(np.minimum(1.0, others / 3).mean(), abs=1e-12)


@pytest.mark.parametrize("n", [0, 1, 9, 11])
def test_textvqa_score_needs_ten_answers(n):
    with pytest.raises(ValueError, match="10 human answers"):
        textvqa_score("yes", ["yes"] * n)


@pytest.mark.parametrize("prediction, expected", [
    ("Yes", "yes"), ("yes.", "yes"), (" Yes.\n", "yes"), ("left..", "left"),
    ("yes .", "yes "),       # official: strip first, then rstrip('.'), so the inner space stays (and scores 0)
    ("The table", "the table"),  # no article or punctuation handling for GQA
    ("3.5", "3.5"),
])
def test_normalize_gqa(prediction, expected):
    assert normalize_gqa(prediction) == expected


def test_gqa_score():
    assert gqa_score("Yes.", ["yes"]) == 1.0
    assert gqa_score("no", ["yes"]) == 0.0
    assert gqa_score("the table", ["table"]) == 0.0
    assert gqa_score("Table", ["Table"]) == 0.0  # the gold answer is compared as is (GQA answers are lower case)
    for answers in ([], ["a", "b"]):
        with pytest.raises(ValueError, match="exactly 1 gold answer"):
            gqa_score("a", answers)

