"""`python -m data.prepare`: build the sample corpus; scan and validate document shards.

    python -m data.prepare sample --out data/sample [--seed N] [--max-languages N]
    python -m data.prepare scan SOURCES... [--out manifest.json] [--tokenizer byte]

`sample` writes the multilingual corpus that ships in `data/sample/`: real text in every
FLORES-200 language the Unicode CLDR has a locale for (names of languages and countries,
months and dates, units, currencies, time zones, ... in that language and script), from
Babel's copy of CLDR, so it builds offline, and byte-identically for given versions of Babel
(its CLDR data) and zstandard. Babel is a dev dependency, imported only by `sample`.

`scan` reads shards and writes a JSON manifest: documents, bytes and tokens per language and
in total, and the bad records with file:line and reason (it reads on past them, counting).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fsspec

from data.languages import LANGUAGES
from data.shards import DocumentError, expand_sources, iter_documents, write_documents
from data.tokenizer import build_tokenizer

NUM_SHARDS = 4
SAMPLE_ZSTD_LEVEL = 19
SECTION_BYTES = 3000
"""Text budget of one document; it keeps rich locales from drowning the sparse ones."""
NAMES_PER_LINE = 6
MAX_LISTED_BAD = 1000

# FLORES-200 code -> CLDR locale, where the locale really is that language in that script.
# Left out on purpose: Arabic dialects (CLDR's ar_EG, ar_MA are Standard Arabic), Twi (CLDR's
# `ak` is already aka_Latn), Nigerian Fulfulde (CLDR's `ff` is Pulaar), Luba-Kasai (CLDR's
# `lu` is Luba-Katanga). tzm_Tfng uses `zgh`, the standard built on Central Atlas Tamazight.
_CLDR_TABLE = """
afr_Latn af   aka_Latn ak   als_Latn sq   amh_Ethi am   apc_Arab apc  arb_Arab ar
asm_Beng as   ast_Latn ast  azb_Arab az_Arab  azj_Latn az_Latn  bak_Cyrl ba  bam_Latn bm
bel_Cyrl be   bem_Latn bem  ben_Beng bn   bho_Deva bho  bod_Tibt bo   bos_Latn bs_Latn
bul_Cyrl bg   cat_Latn ca   ceb_Latn ceb  ces_Latn cs   ckb_Arab ckb  cym_Latn cy
dan_Latn da   deu_Latn de   dzo_Tibt dz   ell_Grek el   eng_Latn en   epo_Latn eo
est_Latn et   eus_Latn eu   ewe_Latn ee   fao_Latn fo   fin_Latn fi   fra_Latn fr
fur_Latn fur  gaz_Latn om   gla_Latn gd   gle_Latn ga   glg_Latn gl   grn_Latn gn
guj_Gujr gu   hat_Latn ht   hau_Latn ha   heb_Hebr he   hin_Deva hi   hrv_Latn hr
hun_Latn hu   hye_Armn hy   ibo_Latn ig   ind_Latn id   isl_Latn is   ita_Latn it
jav_Latn jv   jpn_Jpan ja   kab_Latn kab  kam_Latn kam  kan_Knda kn   kas_Arab ks_Arab
kas_Deva ks_Deva  kat_Geor ka   kaz_Cyrl kk_Cyrl  kea_Latn kea  khk_Cyrl mn   khm_Khmr km
kik_Latn ki   kin_Latn rw   kir_Cyrl ky   kmr_Latn ku   kor_Hang ko   lao_Laoo lo
lij_Latn lij  lin_Latn ln   lit_Latn lt   lmo_Latn lmo  ltg_Latn ltg  ltz_Latn lb
lug_Latn lg   luo_Latn luo  lvs_Latn lv   mai_Deva mai  mal_Mlym ml   mar_Deva mr
mkd_Cyrl mk   mlt_Latn mt   mni_Beng mni_Beng  mri_Latn mi   mya_Mymr my   nld_Latn nl
nno_Latn nn   nob_Latn nb   npi_Deva ne   nso_Latn nso  nus_Latn nus  nya_Latn ny
oci_Latn oc   ory_Orya or   pan_Guru pa_Guru  pap_Latn pap  pbt_Arab ps   pes_Arab fa
plt_Latn mg   pol_Latn pl   por_Latn pt   prs_Arab fa_AF  quy_Latn qu   ron_Latn ro
run_Latn rn   rus_Cyrl ru   sag_Latn sg   san_Deva sa   sat_Olck sat_Olck  scn_Latn scn
shn_Mymr shn  sin_Sinh si   slk_Latn sk   slv_Latn sl   sna_Latn sn   snd_Arab sd_Arab
som_Latn so   sot_Latn st   spa_Latn es   srd_Latn sc   srp_Cyrl sr_Cyrl  ssw_Latn ss
sun_Latn su_Latn  swe_Latn sv   swh_Latn sw   szl_Latn szl  tam_Taml ta   tat_Cyrl tt
tel_Telu te   tgk_Cyrl tg   tgl_Latn fil  tha_Thai th   tir_Ethi ti   tpi_Latn tpi
tsn_Latn tn   tso_Latn ts   tuk_Latn tk   tur_Latn tr   tzm_Tfng zgh  uig_Arab ug
ukr_Cyrl uk   urd_Arab ur   uzn_Latn uz_Latn  vec_Latn vec  vie_Latn vi   wol_Latn wo
xho_Latn xh   ydd_Hebr yi   yor_Latn yo   yue_Hant yue_Hant  zho_Hans zh_Hans
zho_Hant zh_Hant  zsm_Latn ms   zul_Latn zu
"""
_CLDR_WORDS = _CLDR_TABLE.split()
CLDR_LOCALES: dict[str, str] = dict(zip(_CLDR_WORDS[::2], _CLDR_WORDS[1::2], strict=True))

# Fixed inputs: the corpus must not depend on today's date or on the machine.
_DATES = tuple(datetime.date(1990 + 3 * m, m, 2 * m + 1) for m in range(1, 13))
_DELTAS = (
    datetime.timedelta(seconds=30),
    datetime.timedelta(minutes=45),
    datetime.timedelta(hours=3),
    datetime.timedelta(days=2),
    datetime.timedelta(weeks=5),
    datetime.timedelta(days=95),
    datetime.timedelta(days=800),
)
_AMOUNTS = (1, 2, 3, 5, 12, 100, 2.5)
_CALENDAR_FIELDS = (
    ("months", "format", "wide"),
    ("months", "stand-alone", "wide"),
    ("months", "format", "abbreviated"),
    ("days", "format", "wide"),
    ("days", "stand-alone", "wide"),
    ("quarters", "format", "wide"),
    ("eras", "wide"),
    ("day_periods", "format", "wide"),
)


# ---------------------------------------------------------------------------------- sample


def sample_records(*, seed: int = 0, max_languages: int | None = None) -> list[dict[str, str]]:
    """The sample corpus as records, ordered by language code then document number."""
    from babel import Locale  # dev dependency: only building the sample needs it

    root = Locale("root")
    codes = sorted(CLDR_LOCALES)[:max_languages]
    records = []
    for code in codes:
        locale = Locale.parse(CLDR_LOCALES[code])
        texts = _language_texts(locale, root, random.Random(f"{seed}:{code}"))
        records += [{"id": f"{code}-{n}", "lang": code, "text": t} for n, t in enumerate(texts)]
    return records


def write_sample(out: str, *, seed: int = 0, max_languages: int | None = None) -> dict[str, int]:
    """Write the sample corpus as NUM_SHARDS `.jsonl.zst` shards under `out`; a summary."""
    records = sample_records(seed=seed, max_languages=max_languages)
    # A seeded shuffle spreads every language over every shard, so any one shard is a mix.
    random.Random(seed).shuffle(records)
    for index in range(NUM_SHARDS):
        path = f"{out.rstrip('/')}/sample-{index:05d}-of-{NUM_SHARDS:05d}.jsonl.zst"
        write_documents(path, records[index::NUM_SHARDS], level=SAMPLE_ZSTD_LEVEL)
    return {
        "languages": len({r["lang"] for r in records}),
        "documents": len(records),
        "bytes": sum(len(r["text"].encode("utf-8")) for r in records),
        "shards": NUM_SHARDS,
    }


def _language_texts(locale: Any, root: Any, rng: random.Random) -> list[str]:
    """One document per kind of CLDR data the locale has, each within SECTION_BYTES."""
    sections = (
        _name_lines(locale, root, "languages"),
        _name_lines(locale, root, "territories"),
        _name_lines(locale, root, "scripts") + _name_lines(locale, root, "variants"),
        _name_lines(locale, root, "currencies") + _currency_lines(locale, root),
        _calendar_lines(locale, root),
        _relative_time_lines(locale, root),
        _unit_lines(locale, root),
        _time_zone_lines(locale, root),
    )
    texts = ("\n".join(_pick_lines(lines, rng)) for lines in sections)
    return [text for text in texts if text]


def _pick_lines(lines: list[str], rng: random.Random) -> list[str]:
    """A seeded random subset within the byte budget, kept in the original order, so a
    budget cut samples the whole list rather than its alphabetical start."""
    order = list(dict.fromkeys(lines))
    rng.shuffle(order)
    chosen, size = set(), 0
    for line in order:
        size += len(line.encode("utf-8")) + 1
        if size > SECTION_BYTES:
            break
        chosen.add(line)
    return [line for line in dict.fromkeys(lines) if line in chosen]


def _localized(format_text: Callable[[Any], str], locale: Any, root: Any) -> list[str]:
    """[format_text(locale)] where the locale has its own data for it, else []: where CLDR
    falls back to root, the result is codes and placeholders ("M01", "5 length-meter")."""
    try:
        text = format_text(locale)
    except (LookupError, ValueError):
        return []
    try:
        fallback = format_text(root)
    except (LookupError, ValueError):
        fallback = None
    return [text] if text.strip() and text != fallback else []


def _chunked_lists(words: list[str], locale: Any) -> list[str]:
    from babel.lists import format_list

    chunks = (words[i : i + NAMES_PER_LINE] for i in range(0, len(words), NAMES_PER_LINE))
    return [format_list(chunk, locale=locale) for chunk in chunks]


def _name_lines(locale: Any, root: Any, attribute: str) -> list[str]:
    names, fallback = getattr(locale, attribute), getattr(root, attribute)
    own = [names[key] for key in sorted(names) if names[key] != fallback.get(key)]
    return _chunked_lists(own, locale)


def _currency_lines(locale: Any, root: Any) -> list[str]:
    from babel.numbers import format_currency

    lines = []
    for index, code in enumerate(sorted(locale.currencies)):
        amount = _AMOUNTS[index % len(_AMOUNTS)]
        texts = _localized(
            lambda loc, a=amount, c=code: format_currency(a, c, format_type="name", locale=loc),
            locale,
            root,
        )
        # Without a name of its own, babel writes the ISO code: "2,50 EUR".
        lines += [text for text in texts if code not in text]
    return lines


def _calendar_lines(locale: Any, root: Any) -> list[str]:
    from babel.dates import format_date
    from babel.lists import format_list

    lines = []
    for field in _CALENDAR_FIELDS:
        values, fallback = _lookup(locale, field), _lookup(root, field)
        own = [values[key] for key in sorted(values) if values[key] != fallback.get(key)]
        if own:
            lines.append(format_list(own, locale=locale))
    for day in _DATES:
        lines += _localized(lambda loc, d=day: format_date(d, "full", locale=loc), locale, root)
    return lines


def _lookup(locale: Any, field: tuple[str, ...]) -> Any:
    value = getattr(locale, field[0])
    for key in field[1:]:
        value = value.get(key, {})
    return value


def _relative_time_lines(locale: Any, root: Any) -> list[str]:
    from babel.dates import format_timedelta

    lines = []
    signed_deltas = [signed for delta in _DELTAS for signed in (delta, -delta)]
    for delta in signed_deltas:
        for direction in (True, False):
            lines += _localized(
                lambda loc, t=delta, d=direction: format_timedelta(t, add_direction=d, locale=loc),
                locale,
                root,
            )
    return lines


def _unit_lines(locale: Any, root: Any) -> list[str]:
    from babel.units import format_unit

    lines = []
    for index, unit in enumerate(sorted(locale.unit_display_names)):
        amount = _AMOUNTS[index % len(_AMOUNTS)]
        texts = _localized(
            lambda loc, a=amount, u=unit: format_unit(a, u, length="long", locale=loc),
            locale,
            root,
        )
        # Without a pattern of its own, babel writes the unit's id: "2,5 length-meter".
        lines += [text for text in texts if unit not in text]
    return lines


def _time_zone_lines(locale: Any, root: Any) -> list[str]:
    zones = locale.meta_zones
    lines = [
        zones[zone]["long"][kind]
        for zone in sorted(zones)
        for kind in ("generic", "standard", "daylight")
        if kind in zones[zone].get("long", {})
    ]
    cities, fallback = locale.time_zones, root.time_zones
    own = [
        cities[zone]["city"]
        for zone in sorted(cities)
        if "city" in cities[zone] and cities[zone]["city"] != fallback.get(zone, {}).get("city")
    ]
    return lines + _chunked_lists(own, locale)


# ------------------------------------------------------------------------------------ scan


def scan(sources: Sequence[str], tokenizer_name: str = "byte") -> dict[str, Any]:
    """A manifest of the documents in `sources`; bad records are counted, not fatal."""
    tokenizer = build_tokenizer(tokenizer_name)
    files = expand_sources(sources)
    per_language: dict[str, Counter[str]] = {}
    bad: list[DocumentError] = []
    for path in files:
        try:
            for document in iter_documents(path, on_error=bad.append):
                stats = per_language.setdefault(document.lang, Counter())
                stats["documents"] += 1
                stats["bytes"] += len(document.text.encode("utf-8"))
                stats["tokens"] += len(tokenizer.encode(document.text, bos=True, eos=True))
        except DocumentError as error:  # a damaged file: the rest of it is unreadable
            bad.append(error)
    return _manifest(files, tokenizer_name, per_language, bad)


def _manifest(
    files: list[str],
    tokenizer_name: str,
    per_language: dict[str, Counter[str]],
    bad: list[DocumentError],
) -> dict[str, Any]:
    total = sum(per_language.values(), Counter())
    return {
        "files": files,
        "tokenizer": tokenizer_name,
        "tokens_note": "per document: its text's tokens plus bos and eos",
        "total": {key: total[key] for key in ("documents", "bytes", "tokens")},
        "languages": {lang: dict(per_language[lang]) for lang in sorted(per_language)},
        "unknown_languages": sorted(lang for lang in per_language if lang not in LANGUAGES),
        "bad_records": {
            "count": len(bad),
            "listed": [
                {"file": e.source, "line": e.line, "reason": e.reason} for e in bad[:MAX_LISTED_BAD]
            ],
        },
    }


# ------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="build the multilingual sample corpus")
    sample.add_argument("--out", required=True, help="output directory (path or fsspec URL)")
    sample.add_argument("--seed", type=int, default=0, help="selects and orders documents")
    sample.add_argument(
        "--max-languages", type=_positive_int, help="only the first N languages (for tests)"
    )
    scan_cmd = commands.add_parser("scan", help="validate shards and write a manifest")
    scan_cmd.add_argument("sources", nargs="+", help="files, directories, globs or URLs")
    scan_cmd.add_argument("--out", help="write the manifest here (path or fsspec URL)")
    scan_cmd.add_argument("--tokenizer", default="byte", help="tokenizer that counts tokens")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_sample(args: argparse.Namespace) -> int:
    from babel import __version__ as babel_version
    from babel.core import get_cldr_version

    summary = write_sample(args.out, seed=args.seed, max_languages=args.max_languages)
    print(
        f"sample: {summary['languages']} languages, {summary['documents']} documents, "
        f"{summary['bytes']:,} bytes of UTF-8 text in {summary['shards']} shards under "
        f"{args.out} (Babel {babel_version}, CLDR {get_cldr_version()}, seed {args.seed})"
    )
    return 0


def _run_scan(args: argparse.Namespace) -> int:
    manifest = scan(args.sources, args.tokenizer)
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    if args.out:
        with fsspec.open(args.out, "w", encoding="utf-8") as out:
            out.write(text)
    print(text, end="")
    for line in _problems(manifest):
        print(line, file=sys.stderr)
    # Non-zero on bad records, so `scan` can gate a pipeline step.
    return 1 if manifest["bad_records"]["count"] else 0


def _problems(manifest: dict[str, Any]) -> Iterator[str]:
    bad = manifest["bad_records"]
    for record in bad["listed"]:
        yield f"{record['file']}:{record['line']}: {record['reason']}"
    if bad["count"] > len(bad["listed"]):
        yield f"... and {bad['count'] - len(bad['listed'])} more bad records"
    for lang in manifest["unknown_languages"]:
        yield f"warning: language {lang!r} is not a FLORES-200 code"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run_sample(args) if args.command == "sample" else _run_scan(args)
    except FileNotFoundError as error:  # a mistyped source: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
