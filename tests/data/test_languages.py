import re

import pytest

from data import languages
from data.languages import LANGUAGES, Language, closest_code, get_language

# ISO 15924 codes of the scripts FLORES-200 uses.
FLORES_SCRIPTS = {
    "Arab", "Armn", "Beng", "Cyrl", "Deva", "Ethi", "Geor", "Grek", "Gujr", "Guru", "Hang",
    "Hans", "Hant", "Hebr", "Jpan", "Khmr", "Knda", "Laoo", "Latn", "Mlym", "Mymr", "Olck",
    "Orya", "Sinh", "Taml", "Telu", "Tfng", "Thai", "Tibt",
}  # fmt: skip


def test_204_unique_codes() -> None:
    codes = [code for code, _ in languages._FLORES_200]
    assert len(codes) == 204
    assert len(set(codes)) == 204
    assert list(LANGUAGES) == sorted(codes)


def test_codes_and_scripts_well_formed() -> None:
    for code, language in LANGUAGES.items():
        assert re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", code), code
        assert language.code == code
        assert language.script == code[4:]
        assert language.name.strip() == language.name != ""
    assert {language.script for language in LANGUAGES.values()} == FLORES_SCRIPTS


@pytest.mark.parametrize(
    ("code", "name", "script"),
    [
        ("eng_Latn", "English", "Latn"),
        ("zho_Hans", "Chinese (Simplified)", "Hans"),
        ("zho_Hant", "Chinese (Traditional)", "Hant"),
        ("yor_Latn", "Yoruba", "Latn"),
        ("ace_Arab", "Acehnese (Arabic script)", "Arab"),
        ("ace_Latn", "Acehnese (Latin script)", "Latn"),
        ("sat_Olck", "Santali", "Olck"),
        ("tzm_Tfng", "Central Atlas Tamazight", "Tfng"),
    ],
)
def test_known_entries(code: str, name: str, script: str) -> None:
    assert get_language(code) == Language(code, name, script)


@pytest.mark.parametrize(
    ("unknown", "suggestion"),
    [("eng_latn", "eng_Latn"), ("yor_Latin", "yor_Latn"), ("deu_Latm", "deu_Latn")],
)
def test_unknown_code_names_it_and_suggests_the_closest(unknown: str, suggestion: str) -> None:
    with pytest.raises(KeyError) as caught:
        get_language(unknown)
    message = str(caught.value)
    assert repr(unknown) in message
    assert repr(suggestion) in message
    assert closest_code(unknown) == suggestion
