"""TextAttack reference for the attack-parity benchmark: TextAttack 0.3.11's own ``DeepWordBugGao2018``
("char") and ``PWWSRen2019`` ("synonym") recipes, each with ``MaxWordsPerturbed(max_percent=0.2)``
added to its constraints, against the shipped SST-2 student on benchmarks/attack_parity.py's 200 dev
sentences, plain and behind the word normaliser, for seeds 0, 1, 2.

    FEDREX_DATA_DIR=/work/shared/data NLTK_DATA=/tmp/ta-nltk \\
        /tmp/ta-venv/bin/python benchmarks/textattack_parity.py [--seeds 0,1,2] [--out results]

Writes results/attack_parity_textattack.json. Accuracy under attack counts an example as robust only
when it was neither skipped (model already wrong) nor successfully attacked.

TextAttack is not a project dependency; this needs a separate venv that sees the project's packages
(torch, numpy, transformers, datasets, nltk come from .venv and are never installed into it):

    python3 -m venv /tmp/ta-venv
    printf '%s\\n' /work/main/.venv/lib/python3.11/site-packages /work/main \\
        > /tmp/ta-venv/lib/python3.11/site-packages/fedrex_project.pth
    /tmp/ta-venv/bin/pip install --no-deps textattack==0.3.11 jieba lru-dict Levenshtein rapidfuzz \\
        langdetect six pinyin OpenHowNet anytree lemminflect more-itertools num2words word2number \\
        language_tool_python psutil toml bert-score editdistance terminaltables

flair (imported at module level by TextAttack, used only for POS/NER tagging, which these two recipes
never do) is replaced in that venv by a stub package ``flair`` whose ``data.Sentence``,
``data.Tokenizer`` and ``models.SequenceTagger`` raise when used. NLTK data, offline: a folder
(NLTK_DATA) with ``corpora/stopwords/english`` (``models.attacks.STOPWORDS``, one per line) and a copy
(not a symlink: NLTK refuses it) of ``corpora/wordnet.zip``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import textattack  # noqa: E402
from textattack.attack_recipes import DeepWordBugGao2018, PWWSRen2019  # noqa: E402
from textattack.attack_results import SkippedAttackResult, SuccessfulAttackResult  # noqa: E402
from textattack.constraints.overlap import MaxWordsPerturbed  # noqa: E402
from textattack.models.wrappers import ModelWrapper  # noqa: E402

from models.artifact import load_artifact  # noqa: E402
from models.datasets import cached_text_dataset  # noqa: E402
from models.evaluation import take  # noqa: E402
from models.normalizer import WordNormalizer  # noqa: E402
from models.packaged import shipped_file  # noqa: E402
from models.tokenizer import WordPieceTokenizer  # noqa: E402

RECIPES = {"char": DeepWordBugGao2018, "synonym": PWWSRen2019}
BUDGET = 0.2
ROWS = 200


class StudentWrapper(ModelWrapper):
    """Texts -> softmax probabilities [n, 2], through the project's tokenizer (and its normaliser)."""

    def __init__(self, model, tokenizer: WordPieceTokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def __call__(self, text_input_list):
        out = []
        for start in range(0, len(text_input_list), self.batch_size):
            ids = torch.from_numpy(self.tokenizer.encode(list(text_input_list[start:start + self.batch_size])))
            out.append(torch.softmax(self.model(ids), -1).numpy())
        return np.concatenate(out)


def build_attack(recipe, wrapper) -> textattack.Attack:
    """The recipe as TextAttack builds it, rebuilt with MaxWordsPerturbed(max_percent=BUDGET) added."""
    attack = recipe.build(wrapper)
    constraints = attack.pre_transformation_constraints + attack.constraints + [MaxWordsPerturbed(max_percent=BUDGET)]
    return textattack.Attack(attack.goal_function, constraints, attack.transformation, attack.search_method)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="results")
    parser.add_argument("--rows", type=int, default=ROWS, help="dev sentences attacked (smoke tests)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)

    model, config = load_artifact(shipped_file("models/artifacts/sst2-student"))
    model.eval()
    dev, _ = cached_text_dataset("sst2", "validation")
    rows = take(len(dev), args.rows, 0)
    texts = [dev["text"][int(i)] for i in rows]
    labels = [int(dev["label"][int(i)]) for i in rows]
    train, _ = cached_text_dataset("sst2", "train")
    wrappers = {
        "plain": StudentWrapper(model, WordPieceTokenizer(config["max_length"], normalizer=None)),
        "normaliser": StudentWrapper(model, WordPieceTokenizer(
            config["max_length"], normalizer=WordNormalizer.from_texts(train["text"]))),
    }

    runs = []
    for attack_name, recipe in RECIPES.items():
        for defence, wrapper in wrappers.items():
            for seed in seeds:
                start = time.time()
                seed_everything(seed)
                attack = build_attack(recipe, wrapper)
                skipped = succeeded = 0
                queries = []
                for text, label in zip(texts, labels):
                    result = attack.attack(text, label)
                    if isinstance(result, SkippedAttackResult):
                        skipped += 1
                        continue
                    succeeded += isinstance(result, SuccessfulAttackResult)
                    queries.append(result.num_queries)
                seconds = time.time() - start
                run = {"attack": attack_name, "defence": defence, "seed": seed,
                       "clean_acc": 1 - skipped / len(texts),
                       "adv_acc": (len(texts) - skipped - succeeded) / len(texts),
                       "queries": float(np.mean(queries)) if queries else 0.0, "seconds": seconds}
                runs.append(run)
                print(f"[textattack] {attack_name} {defence} seed {seed}: clean {run['clean_acc']:.3f} "
                      f"adv {run['adv_acc']:.3f} queries {run['queries']:.0f} ({seconds:.0f}s)", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack_parity_textattack.json").write_text(json.dumps(
        {"textattack": version("textattack"),
         "rows": len(texts), "budget": BUDGET, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
