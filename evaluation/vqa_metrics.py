"""GQA, TextVQA and POPE answer scoring, as the benchmarks' official evaluation code scores them.

GQA: LLaVA's `convert_gqa_for_eval.py` + GQA's `eval.py` -> exact match of `pred.strip().rstrip('.').lower()`
with the gold answer, which is used as is (GQA gold answers are lower case).
TextVQA: the EvalAI answer processor (mmf/m4c, as used by LLaVA's `m4c_evaluator.py`) and the VQA soft accuracy.
POPE: LLaVA's `eval_pope.py` yes/no reading; accuracy and F1 of "yes" per split (random, popular, adversarial).
Quirks of the official code are reproduced on purpose (each is commented), so our numbers match published ones.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

# Contracted forms the EvalAI processor restores. It maps every form with exactly one apostrophe dropped back to
# the full form (`dont` -> `don't`, `couldnt've` and `couldn'tve` -> `couldn't've`, but not `couldntve`).
# The official table's "I'm"/"I've"/"I'd've" keys are capitalised and never match lower-cased text, so they are
# left out, as are its identity entries (`let's`, `she's`).
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've
o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's
what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
CONTRACTIONS = {
    word[:i] + word[i + 1:]: word for word in _CONTRACTED for i, c in enumerate(word) if c == "'"
}
CONTRACTIONS["somebody'd"] = "somebodyd"  # the official table has this one entry reversed
NUMBERS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5", six="6", seven="7", eight="8",
               nine="9", ten="10")
ARTICLES = frozenset({"a", "an", "the"})
# ',' and '?' are in the official list too, but are already deleted before this step (see `normalize_textvqa`).
PUNCTUATION = ';/[]"{}()=+\\_-><@`!'
# The official pattern `(?!<=\d)(\.)(?!\d)` opens with a mistyped look-behind that is really a look-ahead and
# always holds at a '.', so in effect: a period not followed by a digit ("3.5" keeps it, "dogs." loses it).
_PERIOD = re.compile(r"\.(?!\d)")
# The official call is `sub("", text, re.UNICODE)`: the flag lands in the `count` slot, so at most 32 are removed.
_PERIOD_COUNT = int(re.UNICODE)


def normalize_textvqa(answer: str) -> str:
    """EvalAI / m4c answer normalisation: case, punctuation, periods, number words, articles, contractions."""
    # Commas and question marks go first with no space left behind ("1,000" -> "1000"), so the official
    # digit-comma rule in the punctuation step can never fire; "'s" is split off as a word ("dog's" -> "dog 's").
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in PUNCTUATION:
        # Deleted when it touches a space anywhere in the answer ("a - b" -> "a  b"), else a word break ("t-shirt").
        out = out.replace(p, "" if (p + " " in text or " " + p in text) else " ")
    out = _PERIOD.sub("", out, count=_PERIOD_COUNT)
    words = (NUMBERS.get(w, w) for w in out.split())
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def textvqa_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy: min(#matching humans / 3, 1), averaged over the 10 leave-one-out subsets of 10 answers."""
    if len(answers) != 10:
        raise ValueError(f"TextVQA scoring needs 10 human answers, got {len(answers)}")
    pred = normalize_textvqa(prediction)
    hits = [normalize_textvqa(a) == pred for a in answers]
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(hits)


def normalize_gqa(prediction: str) -> str:
    """LLaVA's GQA post-processing: the decoded text is stripped, then trailing periods dropped and lower-cased."""
    return prediction.strip().rstrip(".").lower()


def gqa_score(prediction: str, answers: Sequence[str]) -> float:
    """GQA accuracy: 1.0 on exact match with the single gold answer, else 0.0."""
    if len(answers) != 1:
        raise ValueError(f"GQA scoring needs exactly 1 gold answer, got {len(answers)}")
    return float(normalize_gqa(prediction) == answers[0])


def normalize_pope(prediction: str) -> str:
    """LLaVA's eval_pope.py: the first sentence, commas dropped, "no" if the words hold "No", "no" or "not", else
    "yes" (so "Yes, no doubt." counts as no, as there)."""
    words = prediction.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_score(prediction: str, answers: Sequence[str]) -> float:
    """POPE accuracy: 1.0 when the normalised prediction is the yes/no label."""
    if len(answers) != 1 or answers[0] not in ("yes", "no"):
        raise ValueError(f"POPE scoring needs one yes/no label, got {list(answers)}")
    return float(normalize_pope(prediction) == answers[0])


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of "yes", and the share of yes answers (%), over one POPE split."""
    pred = [normalize_pope(p) == "yes" for p in predictions]
    gold = [label == "yes" for label in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = max(len(pred), 1)
    return {k: 100 * v for k, v in dict(accuracy=sum(p == g for p, g in zip(pred, gold)) / n, precision=precision,
                                        recall=recall, f1=f1, yes_ratio=sum(pred) / n).items()}


SCORES = {"gqa": gqa_score, "textvqa": textvqa_score, "pope": pope_score}
