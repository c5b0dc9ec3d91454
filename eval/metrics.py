"""Benchmark metrics, written from the benchmarks' published definitions.

Per-sample functions take the model's text and the reference; aggregate functions take
lists. Scores are fractions in [0, 1] here; the tasks report them in percent.

- VQA soft accuracy (VQAv2, TextVQA): an answer given by k of the 10 annotators scores the
  mean, over the 10 leave-one-out subsets of 9, of min(1, matches / 3), after the EvalAI
  answer normalisation of both sides (`normalize_answer`).
- POPE: the answer is "no" when the first sentence holds the word "no" or "not", else
  "yes"; "yes" is the positive class; yes-ratio is the share of "yes" predictions.
- MME: per category, acc = share of questions right, acc+ = share of images with both of
  their questions right; the category's score is acc + acc+ in percent (at most 200);
  perception and cognition are sums of their categories' scores.
"""

from __future__ import annotations

import re
from collections import defaultdict

from ..checks import UsageError

# --- VQA answer normalisation (the EvalAI processor used by VQAv2's and TextVQA's servers) ---

# `p` is deleted when it touches a space somewhere in the text, else replaced by a space.
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its own)
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS["none"] = "0"  # as the official table: "none" and "0" are the same answer
ARTICLES = {"a", "an", "the"}
# Contractions written without their apostrophe, mapped back (the official table; keys with
# capitals are kept though they never match lower-cased text, and "somebody'd" -> "somebodyd"
# is the official table's own entry).
CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
    itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
    mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
    neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
    'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
    shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
    somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
    someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
    someones=someone's somethingd=something'd somethingd've=something'd've
    something'dve=something'd've somethingll=something'll thats=that's thered=there'd
    thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
    theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
    wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
    whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
    whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
    whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
    wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
    you'dve=you'd've youll=you'll youre=you're youve=you've
    """.split()
)


def normalize_answer(text: str) -> str:
    """The EvalAI VQA answer normalisation: lower case; drop commas and question marks;
    "'s" split off; punctuation deleted or turned into spaces; periods not followed by a
    digit deleted; number words to digits; articles dropped; contractions restored."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in PUNCTUATION:
        touches_space = p + " " in text or " " + p in text
        out = out.replace(p, "" if touches_space else " ")
    out = PERIOD.sub("", out)
    words = [NUMBERS.get(w, w) for w in out.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA soft accuracy of one prediction against the annotators' answers."""
    if not answers:
        raise UsageError("vqa_accuracy needs at least one reference answer")
    prediction = normalize_answer(prediction)
    answers = [normalize_answer(a) for a in answers]
    total = 0.0
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1 :]
        total += min(1.0, sum(a == prediction for a in others) / 3)
    return total / len(answers)


def exact_match(prediction: str, answers: str | list[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference answer."""
    answers = [answers] if isinstance(answers, str) else answers
    prediction = normalize_answer(prediction)
    return float(any(normalize_answer(a) == prediction for a in answers))


# --- multiple choice --------------------------------------------------------------------

# "B", "B.", "B)", "B: ...", "(B) ...": not "A cat", where "A" is an article
LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])(?:[.):]|$))")


def option_letter(prediction: str, choices: list[str]) -> str | None:
    """The option a prediction picks: a leading letter ("B", "B.", "(B) ...") among the
    choices' letters, else the letter of the choice whose text it equals; None otherwise."""
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    match = LETTER.match(prediction)
    picked = match and (match.group(1) or match.group(2))
    if picked in letters:
        return picked
    said = normalize_answer(prediction)
    for letter, choice in zip(letters, choices):
        if normalize_answer(choice) == said:
            return letter
    return None


# --- POPE -------------------------------------------------------------------------------


def pope_answer(prediction: str) -> str:
    """POPE's reading of a free-form answer: its first sentence, commas removed, is "no"
    when it holds the word "no"/"No"/"not", else "yes"."""
    sentence = prediction.split(".")[0].replace(",", "")
    return "no" if {"no", "No", "not"} & set(sentence.split()) else "yes"


def pope_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" positive) and yes-ratio of POPE answers
    ("yes"/"no", as from `pope_answer`)."""
    if len(predictions) != len(references) or not predictions:
        raise UsageError("pope_metrics needs as many predictions as references, at least one")
    pairs = list(zip(predictions, references))
    tp = sum(p == "yes" and r == "yes" for p, r in pairs)
    fp = sum(p == "yes" and r == "no" for p, r in pairs)
    fn = sum(p == "no" and r == "yes" for p, r in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return dict(
        accuracy=sum(p == r for p, r in pairs) / len(pairs),
        precision=precision,
        recall=recall,
        f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        yes_ratio=sum(p == "yes" for p in predictions) / len(predictions),
    )


# --- MME --------------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_answer(prediction: str) -> str:
    """ "yes", "no" or "other", as MME's evaluation tool reads an answer: lower-cased, "yes" or
    "no" itself, else whichever of them occurs in its first four characters."""
    text = prediction.lower().strip()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def mme_scores(results: list[tuple[str, str, bool]]) -> dict[str, float]:
    """MME scores from (category, image id, correct) per question: `<category>_acc`,
    `<category>_acc_plus`, `<category>` (acc + acc+, in percent), `perception`, `cognition`."""
    images: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for category, image, correct in results:
        if category not in MME_PERCEPTION + MME_COGNITION:
            raise UsageError(
                f"unknown MME category {category!r}; expected one of {', '.join(MME_PERCEPTION + MME_COGNITION)}"
            )
        images[category][image].append(bool(correct))
    scores: dict[str, float] = {}
    for category, per_image in images.items():
        answers = [c for marks in per_image.values() for c in marks]
        acc = 100 * sum(answers) / len(answers)
        acc_plus = 100 * sum(all(marks) for marks in per_image.values()) / len(per_image)
        scores[f"{category}_acc"], scores[f"{category}_acc_plus"] = acc, acc_plus
        scores[category] = acc + acc_plus
    scores["perception"] = sum(scores.get(c, 0.0) for c in MME_PERCEPTION)
    scores["cognition"] = sum(scores.get(c, 0.0) for c in MME_COGNITION)
    return scores
