"""The shipped multilingual sample corpus (`python -m data.prepare sample`).

`sample` writes the multilingual corpus that ships in `data/sample/`: real text, in the
language's own script, in 187 of the 204 FLORES-200 languages, from data that ships inside three
PyPI packages, so it builds offline, and byte-identically for given versions of them and of
zstandard:
- Babel's copy of the Unicode CLDR (CLDR_LOCALES): names of languages and countries, months
  and dates, units, currencies, time zones, ... in that language;
- gflanguages, Google Fonts' language database (SPECIMEN_IDS): its sample texts, sentences
  of the Universal Declaration of Human Rights in that language;
- pycountry's iso-codes translations (ISO_CODES_LOCALES): names of countries, languages,
  currencies and scripts, for a language CLDR lacks.
They are dev dependencies, imported only by `sample`.
"""

from __future__ import annotations

import datetime
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from data.shards import (
    write_documents,
)

NUM_SHARDS = 4
SAMPLE_ZSTD_LEVEL = 19
SECTION_BYTES = 3000
"""Text budget of one document; it keeps rich locales from drowning the sparse ones."""
NAMES_PER_LINE = 6

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

# FLORES-200 code -> gflanguages id whose sample text is that language in that script: sentences
# of the Universal Declaration of Human Rights, mostly. Like CLDR, gflanguages writes ISO 639-1
# codes where they exist and the macrolanguage where FLORES-200 names its standard member
# (`sq_Latn` for als_Latn, `om_Latn` for gaz_Latn, `ay_Latn` for ayr_Latn, `kg_Latn` for
# kon_Latn). twi_Latn is FLORES-200's Akuapem Twi; tzm_Tfng uses `zgh_Tfng`, as for CLDR; arb_Arab
# uses `ar_Arab`, the fuller of its two Standard Arabic texts. Left out on purpose: `fat_Latn`
# (Fante, not aka_Latn), `dip_Latn` (Northeastern Dinka, not dik_Latn), `mni_Mtei` (Meetei
# Mayek script, not mni_Beng).
_SPECIMEN_TABLE = """
ace_Latn ace_Latn   afr_Latn af_Latn   als_Latn sq_Latn   amh_Ethi am_Ethi   arb_Arab ar_Arab
arz_Arab arz_Arab   asm_Beng as_Beng   ast_Latn ast_Latn   ayr_Latn ay_Latn   azb_Arab azb_Arab
azj_Latn az_Latn   bak_Cyrl ba_Cyrl   bam_Latn bm_Latn   ban_Latn ban_Latn   bel_Cyrl be_Cyrl
bem_Latn bem_Latn   ben_Beng bn_Beng   bho_Deva bho_Deva   bod_Tibt bo_Tibt   bos_Latn bs_Latn
bug_Latn bug_Latn   bul_Cyrl bg_Cyrl   cat_Latn ca_Latn   ceb_Latn ceb_Latn   ces_Latn cs_Latn
cjk_Latn cjk_Latn   crh_Latn crh_Latn   cym_Latn cy_Latn   dan_Latn da_Latn   deu_Latn de_Latn
dyu_Latn dyu_Latn   dzo_Tibt dz_Tibt   ell_Grek el_Grek   eng_Latn en_Latn   epo_Latn eo_Latn
est_Latn et_Latn   eus_Latn eu_Latn   ewe_Latn ee_Latn   fao_Latn fo_Latn   fij_Latn fj_Latn
fin_Latn fi_Latn   fon_Latn fon_Latn   fra_Latn fr_Latn   fur_Latn fur_Latn   fuv_Latn fuv_Latn
gaz_Latn om_Latn   gla_Latn gd_Latn   gle_Latn ga_Latn   glg_Latn gl_Latn   grn_Latn gn_Latn
guj_Gujr gu_Gujr   hat_Latn ht_Latn   hau_Latn ha_Latn   heb_Hebr he_Hebr   hin_Deva hi_Deva
hne_Deva hne_Deva   hrv_Latn hr_Latn   hun_Latn hu_Latn   hye_Armn hy_Armn   ibo_Latn ig_Latn
ilo_Latn ilo_Latn   ind_Latn id_Latn   isl_Latn is_Latn   ita_Latn it_Latn   jav_Latn jv_Latn
jpn_Jpan ja_Jpan   kab_Latn kab_Latn   kan_Knda kn_Knda   kas_Arab ks_Arab   kat_Geor ka_Geor
kaz_Cyrl kk_Cyrl   kbp_Latn kbp_Latn   kea_Latn kea_Latn   khk_Cyrl mn_Cyrl   khm_Khmr km_Khmr
kin_Latn rw_Latn   kir_Cyrl ky_Cyrl   kmb_Latn kmb_Latn   kmr_Latn ku_Latn   knc_Latn knc_Latn
kon_Latn kg_Latn   kor_Hang ko_Kore   lao_Laoo lo_Laoo   lij_Latn lij_Latn   lin_Latn ln_Latn
lit_Latn lt_Latn   lmo_Latn lmo_Latn   ltz_Latn lb_Latn   lua_Latn lua_Latn   lug_Latn lg_Latn
lus_Latn lus_Latn   lvs_Latn lv_Latn   mag_Deva mag_Deva   mai_Deva mai_Deva   mal_Mlym ml_Mlym
mar_Deva mr_Deva   min_Arab min_Arab   min_Latn min_Latn   mkd_Cyrl mk_Cyrl   mlt_Latn mt_Latn
mos_Latn mos_Latn   mri_Latn mi_Latn   mya_Mymr my_Mymr   nld_Latn nl_Latn   nno_Latn nn_Latn
nob_Latn nb_Latn   npi_Deva ne_Deva   nso_Latn nso_Latn   nus_Latn nus_Latn   nya_Latn ny_Latn
oci_Latn oc_Latn   ory_Orya or_Orya   pan_Guru pa_Guru   pap_Latn pap_Latn   pbt_Arab ps_Arab
pes_Arab fa_Arab   plt_Latn mg_Latn   pol_Latn pl_Latn   por_Latn pt_Latn   quy_Latn quy_Latn
ron_Latn ro_Latn   run_Latn rn_Latn   rus_Cyrl ru_Cyrl   sag_Latn sg_Latn   san_Deva sa_Deva
sat_Olck sat_Olck   scn_Latn scn_Latn   shn_Mymr shn_Mymr   sin_Sinh si_Sinh   slk_Latn sk_Latn
slv_Latn sl_Latn   smo_Latn sm_Latn   sna_Latn sn_Latn   snd_Arab sd_Arab   som_Latn so_Latn
sot_Latn st_Latn   spa_Latn es_Latn   srd_Latn sc_Latn   srp_Cyrl sr_Cyrl   ssw_Latn ss_Latn
sun_Latn su_Latn   swe_Latn sv_Latn   swh_Latn sw_Latn   szl_Latn szl_Latn   tam_Taml ta_Taml
taq_Latn taq_Latn   taq_Tfng taq_Tfng   tat_Cyrl tt_Cyrl   tel_Telu te_Telu   tgk_Cyrl tg_Cyrl
tgl_Latn fil_Latn   tha_Thai th_Thai   tir_Ethi ti_Ethi   tpi_Latn tpi_Latn   tsn_Latn tn_Latn
tso_Latn ts_Latn   tuk_Latn tk_Latn   tur_Latn tr_Latn   twi_Latn tw_akuapem_Latn
tzm_Tfng zgh_Tfng   uig_Arab ug_Arab   ukr_Cyrl uk_Cyrl   umb_Latn umb_Latn   urd_Arab ur_Arab
uzn_Latn uz_Latn   vec_Latn vec_Latn   vie_Latn vi_Latn   war_Latn war_Latn   wol_Latn wo_Latn
xho_Latn xh_Latn   ydd_Hebr yi_Hebr   yor_Latn yo_Latn   yue_Hant yue_Hant   zho_Hans zh_Hans
zho_Hant zh_Hant   zul_Latn zu_Latn
"""
_SPECIMEN_WORDS = _SPECIMEN_TABLE.split()
SPECIMEN_IDS: dict[str, str] = dict(zip(_SPECIMEN_WORDS[::2], _SPECIMEN_WORDS[1::2], strict=True))

# FLORES-200 code -> pycountry (iso-codes) locale, for a language with no CLDR locale whose
# translation is that language in that script (Crimean Tatar in the Latin alphabet). The
# catalogues of `ace` and `ay` are empty; `ff` does not say which Fula it is (not fuv_Latn).
ISO_CODES_LOCALES = {"crh_Latn": "crh"}

# The FLORES-200 languages none of the three packages has text for, in that language and
# script, and why. Every other one has text from at least one source: 187 of the 204.
_ARABIC_DIALECT = (
    "an Arabic dialect: CLDR's ar_IQ, ar_TN, ar_MA, ar_SA, ... are Modern Standard Arabic; "
    "gflanguages has no sample text for it, iso-codes no translation into it"
)
_NO_SAMPLE_TEXT = (
    "gflanguages lists it without a sample text; no CLDR locale, no iso-codes translation"
)
_NO_ARABIC_SCRIPT = "no source has this language in its Arabic-script orthography"
UNCOVERED: dict[str, str] = {
    **dict.fromkeys(
        ("acm_Arab", "acq_Arab", "aeb_Arab", "ajp_Arab", "ars_Arab", "ary_Arab"), _ARABIC_DIALECT
    ),
    "arb_Latn": (
        "no source writes Standard Arabic in Latin letters, and a transliteration of "
        "unvowelled Arabic script would not be real text"
    ),
    **dict.fromkeys(("ace_Arab", "bjn_Arab", "knc_Arab"), _NO_ARABIC_SCRIPT),
    **dict.fromkeys(
        ("awa_Deva", "bjn_Latn", "kac_Latn", "lim_Latn", "pag_Latn", "tum_Latn"), _NO_SAMPLE_TEXT
    ),
    "dik_Latn": "gflanguages' only Dinka text is Northeastern Dinka (dip), another language",
}
SAMPLE_LANGUAGES: tuple[str, ...] = tuple(
    sorted(set(CLDR_LOCALES) | set(SPECIMEN_IDS) | set(ISO_CODES_LOCALES))
)

Fallbacks = tuple[Any, ...]
"""Babel locales whose data, found again in a locale, is not that locale's own text."""

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
    """The sample corpus as records, ordered by language code then document number: a
    language's CLDR documents, then its iso-codes ones, then its sample-text one."""
    import gflanguages  # dev dependencies: only building the sample needs them
    from babel import Locale

    root, english_locale = Locale("root"), Locale("en")
    specimens = gflanguages.LoadLanguages()
    english = set(_specimen_lines(specimens[SPECIMEN_IDS["eng_Latn"]].sample_text))
    records = []
    for code in SAMPLE_LANGUAGES[:max_languages]:
        texts = []
        if code in CLDR_LOCALES:
            locale = Locale.parse(CLDR_LOCALES[code])
            # What a locale shares with root is codes and placeholders ("M01", "5
            # length-meter"); what it shares with English is not text in its language.
            fallbacks = (root,) if code == "eng_Latn" else (root, english_locale)
            texts += _cldr_texts(locale, fallbacks, random.Random(f"{seed}:{code}"))
        if code in ISO_CODES_LOCALES:
            rng = random.Random(f"{seed}:{code}:iso-codes")
            texts += _iso_codes_texts(ISO_CODES_LOCALES[code], rng)
        if code in SPECIMEN_IDS:
            lines = _specimen_lines(specimens[SPECIMEN_IDS[code]].sample_text)
            # Never an English line under another language's label.
            lines = [line for line in lines if code == "eng_Latn" or line not in english]
            texts += _joined([lines], random.Random(f"{seed}:{code}:specimen"))
        records += [{"id": f"{code}-{n}", "lang": code, "text": t} for n, t in enumerate(texts)]
    return records


def sample_sources() -> str:
    """The versions of the packages whose data the sample is built from: a rebuild is
    byte-identical to the shipped corpus only with these."""
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("babel", "gflanguages", "pycountry"))


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


def _joined(sections: Sequence[list[str]], rng: random.Random) -> list[str]:
    """One document per non-empty section of lines, each within SECTION_BYTES."""
    texts = ("\n".join(_pick_lines(lines, rng)) for lines in sections)
    return [text for text in texts if text]


def _cldr_texts(locale: Any, fallbacks: Fallbacks, rng: random.Random) -> list[str]:
    """One document per kind of CLDR data the locale has, each within SECTION_BYTES."""
    sections = (
        _name_lines(locale, fallbacks, "languages"),
        _name_lines(locale, fallbacks, "territories"),
        _name_lines(locale, fallbacks, "scripts") + _name_lines(locale, fallbacks, "variants"),
        _name_lines(locale, fallbacks, "currencies") + _currency_lines(locale, fallbacks),
        _calendar_lines(locale, fallbacks),
        _relative_time_lines(locale, fallbacks),
        _unit_lines(locale, fallbacks),
        _time_zone_lines(locale, fallbacks),
    )
    return _joined(sections, rng)


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


def _localized(format_text: Callable[[Any], str], locale: Any, fallbacks: Fallbacks) -> list[str]:
    """[format_text(locale)], unless it is empty or what a fallback locale makes of it."""
    try:
        text = format_text(locale)
    except (LookupError, ValueError):
        return []
    for fallback in fallbacks:
        try:
            if format_text(fallback) == text:
                return []
        except (LookupError, ValueError):
            pass
    return [text] if text.strip() else []


def _own(values: Any, others: Sequence[Any]) -> list[str]:
    """The values, in key order, that no fallback has (under any key)."""
    seen = {value for other in others for value in other.values()}
    return [values[key] for key in sorted(values) if values[key] not in seen]


def _chunked_lists(words: list[str], locale: Any) -> list[str]:
    from babel.lists import format_list

    chunks = (words[i : i + NAMES_PER_LINE] for i in range(0, len(words), NAMES_PER_LINE))
    return [format_list(chunk, locale=locale) for chunk in chunks]


def _name_lines(locale: Any, fallbacks: Fallbacks, attribute: str) -> list[str]:
    names = getattr(locale, attribute)
    return _chunked_lists(_own(names, [getattr(f, attribute) for f in fallbacks]), locale)


def _currency_lines(locale: Any, fallbacks: Fallbacks) -> list[str]:
    from babel.numbers import format_currency

    lines = []
    # Only currencies with a name of the locale's own: "1.00 Malawian Kwacha" is English.
    own = set(_own(locale.currencies, [f.currencies for f in fallbacks]))
    for index, code in enumerate(sorted(locale.currencies)):
        if locale.currencies[code] not in own:
            continue
        amount = _AMOUNTS[index % len(_AMOUNTS)]
        texts = _localized(
            lambda loc, a=amount, c=code: format_currency(a, c, format_type="name", locale=loc),
            locale,
            fallbacks,
        )
        # Without a name of its own, babel writes the ISO code: "2,50 EUR".
        lines += [text for text in texts if code not in text]
    return lines


def _calendar_lines(locale: Any, fallbacks: Fallbacks) -> list[str]:
    from babel.dates import format_date
    from babel.lists import format_list

    lines = []
    for field in _CALENDAR_FIELDS:
        values = _lookup(locale, field)
        root_values, *others = (_lookup(fallback, field) for fallback in fallbacks)
        keys = [key for key in sorted(values) if values[key] != root_values.get(key)]
        # Months partly spelt as in English are still the language's own list ("April",
        # "August" in German); a list the locale shares whole with English is not.
        shared = any(all(values[key] == other.get(key) for key in keys) for other in others)
        if keys and not shared:
            lines.append(format_list([values[key] for key in keys], locale=locale))
    for day in _DATES:
        lines += _localized(
            lambda loc, d=day: format_date(d, "full", locale=loc), locale, fallbacks
        )
    return lines


def _lookup(locale: Any, field: tuple[str, ...]) -> Any:
    value = getattr(locale, field[0])
    for key in field[1:]:
        value = value.get(key, {})
    return value


def _relative_time_lines(locale: Any, fallbacks: Fallbacks) -> list[str]:
    from babel.dates import format_timedelta

    lines = []
    signed_deltas = [signed for delta in _DELTAS for signed in (delta, -delta)]
    for delta in signed_deltas:
        for direction in (True, False):
            lines += _localized(
                lambda loc, t=delta, d=direction: format_timedelta(t, add_direction=d, locale=loc),
                locale,
                fallbacks,
            )
    return lines


def _unit_lines(locale: Any, fallbacks: Fallbacks) -> list[str]:
    from babel.units import format_unit

    lines = []
    for index, unit in enumerate(sorted(locale.unit_display_names)):
        amount = _AMOUNTS[index % len(_AMOUNTS)]
        texts = _localized(
            lambda loc, a=amount, u=unit: format_unit(a, u, length="long", locale=loc),
            locale,
            fallbacks,
        )
        # Without a pattern of its own, babel writes the unit's id: "2,5 length-meter".
        lines += [text for text in texts if unit not in text]
    return lines


def _time_zone_lines(locale: Any, fallbacks: Fallbacks) -> list[str]:
    kinds = ("generic", "standard", "daylight")

    def zone_names(loc: Any) -> dict[tuple[str, int], str]:
        zones = loc.meta_zones
        return {
            (zone, index): zones[zone]["long"][kind]
            for zone in zones
            for index, kind in enumerate(kinds)
            if kind in zones[zone].get("long", {})
        }

    def city_names(loc: Any) -> dict[str, str]:
        zones = loc.time_zones
        return {zone: zones[zone]["city"] for zone in zones if "city" in zones[zone]}

    lines = _own(zone_names(locale), [zone_names(f) for f in fallbacks])
    cities = _own(city_names(locale), [city_names(f) for f in fallbacks])
    return lines + _chunked_lists(cities, locale)


# The fields of a gflanguages sample text that hold running text; the posters are headlines
# of a word or two, cut from these.
_SPECIMEN_FIELDS = (
    "styles",
    "tester",
    "specimen_48",
    "specimen_36",
    "specimen_32",
    "specimen_21",
    "specimen_16",
)
# A whole line in brackets is the UDHR project's note of a gap ("[Missing]"), in English.
_GAP_NOTE = re.compile(r"[\[(][^\])]*[\])]")


def _specimen_lines(sample_text: Any) -> list[str]:
    """The distinct lines of a gflanguages sample text. Its fields repeat and cut one another
    (a tester is the start of a specimen), so keep each line that no other line contains."""
    lines = [
        line.strip()
        for field in _SPECIMEN_FIELDS
        for line in getattr(sample_text, field).split("\n")
    ]
    lines = list(dict.fromkeys(line for line in lines if line and not _GAP_NOTE.fullmatch(line)))
    return [line for line in lines if not any(line != other and line in other for other in lines)]


# pycountry databases and the iso-codes gettext domain of each; one document per group.
_ISO_CODES_GROUPS = (
    (("countries", "iso3166-1"), ("historic_countries", "iso3166-3")),
    (("languages", "iso639-3"), ("language_families", "iso639-5")),
    (("currencies", "iso4217"), ("scripts", "iso15924")),
)


def _iso_codes_texts(locale: str, rng: random.Random) -> list[str]:
    """One document per group of iso-codes databases the locale translates, each within
    SECTION_BYTES: its names of countries, languages, currencies and scripts."""
    import gettext

    import pycountry

    sections = []
    for group in _ISO_CODES_GROUPS:
        names = []
        for database, domain in group:
            catalog = gettext.translation(
                domain, pycountry.LOCALES_DIR, languages=[locale], fallback=True
            )
            english = {record.name for record in getattr(pycountry, database)}
            # An untranslated name comes back as the English one: not text in the language.
            names += [name for name in map(catalog.gettext, sorted(english)) if name not in english]
        words = list(dict.fromkeys(names))
        chunks = (words[i : i + NAMES_PER_LINE] for i in range(0, len(words), NAMES_PER_LINE))
        sections.append([", ".join(chunk) for chunk in chunks])
    return _joined(sections, rng)
