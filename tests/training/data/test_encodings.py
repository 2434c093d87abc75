"""Local data in legacy Korean, Japanese and Chinese encodings: read with data.encoding, and without it an
error that names the encoding the file is most likely in (never applied on its own)."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import cli_in_process
from training.data import encodings, sources
from training.data.encodings import likely_encoding
from training.data.prepare import read_examples
from training.data.templates import resolve_template
from training.errors import DataError, RecipeError
from training.recipe import DataSection, recipe_from_dict

# A cell with a line break in it, as spreadsheets write one: quoted over two lines of the CSV.
KOREAN = [
    {"instruction": "대한민국의 수도는 어디입니까?", "output": "서울입니다.\n인구는 약 천만 명입니다."},
    {"instruction": "김치는 무엇인가요?", "output": "배추와 고춧가루로 만든 한국의 발효 음식입니다."},
    {"instruction": "“존댓말”을 설명해 주세요.", "output": "상대를 높이는 말투입니다."},
]
JAPANESE = [
    {"instruction": "日本の首都はどこですか？", "output": "東京です。\n人口は約千四百万人です。"},
    {"instruction": "富士山の高さは？", "output": "３７７６メートルです。"},
    {"instruction": "「敬語」を説明してください。", "output": "相手を敬う言葉づかいです。"},
]
# Windows' own characters (①, NEC row 13) that only CP932 among the Japanese codecs has.
JAPANESE_WINDOWS = [*JAPANESE, {"instruction": "①の読み方は？", "output": "「いち」または「まるいち」です。"}]
# Chinese as Excel on Chinese Windows saves it: GBK (a subset of GB18030) and Big5 (CP950).
SIMPLIFIED = [
    {
        "instruction": "中国的首都是哪里？",
        "output": "中国的首都是北京。\n北京有三千多年的建城史，常住人口约2,180万。",
    },
    {
        "instruction": "请用简单的话解释什么是机器学习。",
        "output": "机器学习是让计算机从数据中找出规律的方法。比如，给模型看很多标注好的图片，它就能学会分辨猫和狗。"
        "常见的框架有 PyTorch 和 TensorFlow。",
    },
    {
        "instruction": "“微调”（fine-tuning）和从头训练有什么区别？",
        "output": "微调是在已经预训练好的模型上，用少量领域数据继续训练；从头训练则需要大量数据和算力。"
        "用 QLoRA 在一张 24GB 显卡上就能微调 7B 模型。",
    },
    {
        "instruction": "如何在 Excel 里把表格保存为 CSV 文件？",
        "output": "点击“文件”→“另存为”，在“保存类型”中选择“CSV（逗号分隔）”，然后点“保存”。",
    },
    {
        "instruction": "推荐几本适合初学者的编程书。",
        "output": "可以从《Python编程：从入门到实践》开始，再读《算法图解》。每天写一点代码，坚持三个月，进步会很明显。",
    },
]
TRADITIONAL = [
    {
        "instruction": "臺灣最高的山是哪一座？",
        "output": "臺灣最高的山是玉山，海拔約3,952公尺。\n它也是東北亞的最高峰。",
    },
    {
        "instruction": "請用簡單的話解釋什麼是機器學習。",
        "output": "機器學習是讓電腦從資料中找出規律的方法。例如，給模型看很多標註好的圖片，它就能學會分辨貓和狗。"
        "常見的框架有 PyTorch 和 TensorFlow。",
    },
    {
        "instruction": "「微調」（fine-tuning）和從頭訓練有什麼不同？",
        "output": "微調是在已經預訓練好的模型上，用少量領域資料繼續訓練；從頭訓練則需要大量資料與運算資源。"
        "用 QLoRA 在一張 24GB 顯示卡上就能微調 7B 模型。",
    },
    {
        "instruction": "如何在 Excel 裡把表格存成 CSV 檔？",
        "output": "點選「檔案」→「另存新檔」，在「存檔類型」中選擇「CSV（逗號分隔）」，然後按「儲存」。",
    },
    {
        "instruction": "推薦幾本適合初學者的程式設計書。",
        "output": "可以從《Python程式設計：從入門到實踐》開始，再讀《演算法圖解》。每天寫一點程式，堅持三個月，進步會很明顯。",
    },
]
# Characters that Windows' CP950 has and Python's big5 does not: €, and 恒 among seven hanzi it added.
TRADITIONAL_WINDOWS = [
    *TRADITIONAL,
    {"instruction": "「恒心」的「恒」怎麼寫？", "output": "「恒」是「恆」的異體字，兩種寫法都很常見。"},
    {"instruction": "這支耳機在歐洲賣多少錢？", "output": "大約 €129，含稅。"},
]

# (rows, the encoding the file is written in, the encoding the error should name)
LEGACY = [
    (KOREAN, "cp949", "cp949"),
    (KOREAN, "euc-kr", "cp949"),  # CP949 reads all of EUC-KR
    (JAPANESE_WINDOWS, "cp932", "cp932"),
    (JAPANESE, "shift_jis", "cp932"),
    (JAPANESE, "euc-jp", "euc-jp"),
    (SIMPLIFIED, "gbk", "gb18030"),  # GB18030 reads all of GBK, and GBK all of GB2312
    (SIMPLIFIED, "gb2312", "gb18030"),
    (SIMPLIFIED, "gb18030", "gb18030"),
    (TRADITIONAL, "big5", "cp950"),  # CP950 reads all of Big5
    (TRADITIONAL_WINDOWS, "cp950", "cp950"),
]
KINDS = ["csv", "jsonl", "json"]


def text_of(rows: list[dict], kind: str) -> str:
    if kind == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["instruction", "output"], lineterminator="\r\n")  # as Excel
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    if kind == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return json.dumps(rows, ensure_ascii=False, indent=1)


def write(path: Path, rows: list[dict], encoding: str) -> Path:
    path.write_bytes(text_of(rows, path.suffix[1:]).encode(encoding))
    return path


def section(source: Path, **kw) -> DataSection:
    return DataSection(source=str(source), format="instruction", template="koalpaca", **kw)


def examples(cfg: DataSection) -> list[dict]:
    return [e.as_json() for e in read_examples(cfg, resolve_template(cfg.template)).train]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("rows", "encoding", "named"), LEGACY)
def test_legacy_file_reads_with_data_encoding_as_its_utf8_copy_does(tmp_path, rows, encoding, named, kind):
    utf8 = write(tmp_path / f"utf8.{kind}", rows, "utf-8")
    legacy = write(tmp_path / f"legacy.{kind}", rows, encoding)
    expected = examples(section(utf8))
    assert len(expected) == len(rows) and "\n" in expected[0]["messages"][1]["content"]
    assert examples(section(legacy, encoding=encoding)) == expected
    assert examples(section(legacy, encoding=named)) == expected  # what the error tells them to set


@pytest.mark.parametrize("kind", ["csv", "json"])
@pytest.mark.parametrize(("rows", "encoding", "named"), LEGACY)
def test_legacy_file_without_data_encoding_names_the_one_to_set(tmp_path, rows, encoding, named, kind):
    path = write(tmp_path / f"d.{kind}", rows, encoding)
    with pytest.raises(DataError) as e:
        examples(section(path))
    message = str(e.value)
    line = 2 if kind == "csv" else 3  # the first row; in the JSON, after "[" and " {"
    assert message.startswith(f"{path} line {line}: not UTF-8 text (byte 0x"), message
    assert f"it decodes as {named} (" in message
    assert f"set data.encoding: {named} in the recipe, or save the file as UTF-8" in message


@pytest.mark.parametrize(("rows", "encoding", "named"), LEGACY)
def test_json_lines_name_the_encoding_once_on_the_first_line_that_does_not_decode(
    tmp_path, rows, encoding, named
):
    # A UTF-8 file with rows pasted in from a legacy one: each such line is a bad row by its number.
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
    lines[1:] = [json.dumps(r, ensure_ascii=False).encode(encoding) for r in rows[1:]]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as e:
        examples(section(path))
    assert f"{path} line 2: (row): not UTF-8 text (byte 0x" in str(e.value)
    assert f"set data.encoding: {named} in the recipe" in str(e.value)

    skipped = read_examples(section(path, on_bad_row="skip"), resolve_template("koalpaca")).train_report
    assert (skipped.rows_read, skipped.rows_skipped_bad) == (len(rows), len(rows) - 1)
    first, *others = skipped.bad_rows
    assert f"data.encoding: {named}" in first
    assert others and all("data.encoding" not in b for b in others)  # said once, not on every row


def test_file_in_neither_language_suggests_no_encoding(tmp_path):
    french = tmp_path / "fr.csv"
    french.write_bytes(
        "instruction,output\nOù est la bibliothèque ?,À côté de l'église ; très près.\n".encode("latin-1")
    )
    noise = tmp_path / "noise.csv"
    noise.write_bytes(b"instruction,output\n" + random.Random(0).randbytes(2000))
    for path in (french, noise):
        with pytest.raises(DataError) as e:
            examples(section(path))
        assert f"{path} line 2: not UTF-8 text" in str(e.value)
        assert "save the file as UTF-8, or set data.encoding to the encoding it is in" in str(e.value)
        assert "decodes as" not in str(e.value)


def test_the_guess_is_by_script_where_the_byte_ranges_overlap():
    # Shift-JIS kana are valid CP949 (ありがとう reads as 궇귟궕궴궎, Hangul no one writes), and EUC-KR Hangul
    # is valid EUC-JP (대한민국 reads as 企廃肯厩, kanji without a kana between them).
    assert likely_encoding("ありがとうございます".encode("cp932"), None).codec == "cp932"
    assert likely_encoding("대한민국의 수도는 서울".encode("cp949"), None).codec == "cp949"
    assert likely_encoding("대한민국의 수도는 서울".encode("cp949"), "cp949") is None
    assert likely_encoding("ありがとうございます".encode("cp932"), "cp932") is None
    # EUC-KR's Hangul are GB2312's hanzi byte for byte (대한민국 reads as 措茄刮惫 in GB18030), and EUC-JP's
    # kana Big5's frequent hanzi (ありがとう reads as 丐曰互午丹 in CP950): Korean and Japanese come first.
    assert likely_encoding("대한민국의 수도는 서울".encode("euc-kr"), None).codec == "cp949"
    assert likely_encoding("ありがとうございます".encode("euc-jp"), None).codec == "euc-jp"
    assert likely_encoding("中国的首都是北京".encode("gbk"), None).codec == "gb18030"
    assert likely_encoding("臺灣最高的山是玉山".encode("big5"), None).codec == "cp950"


@pytest.mark.parametrize(("rows", "encoding", "named"), LEGACY)
def test_each_row_alone_is_named_by_its_own_language(rows, encoding, named):
    # Korean and Japanese never named Chinese, nor Chinese Korean or Japanese, though GB18030 and CP950
    # decode nearly any Korean or Japanese bytes, and CP949 many GBK ones.
    for row in rows:
        line = json.dumps(row, ensure_ascii=False).encode(encoding)
        assert likely_encoding(line, None).codec == named, row


def test_a_stray_byte_does_not_make_a_korean_file_chinese(tmp_path):
    # 0xC9A1 is no CP949 character but GB2312's 伞: the file decodes in GB18030 alone, all common hanzi there.
    path = tmp_path / "ko.csv"
    path.write_bytes(text_of(KOREAN, "csv").encode("cp949").replace(b"\n", b"\n\xc9\xa1", 1))
    with pytest.raises(DataError) as e:
        examples(section(path))
    assert "save the file as UTF-8, or set data.encoding to the encoding it is in" in str(e.value)
    with pytest.raises(DataError, match="reads as Korean text in cp949 as well"):
        examples(section(path, encoding="gb18030"))


def test_cp950_reads_what_excel_on_traditional_chinese_windows_writes_where_big5_does_not(tmp_path):
    path = write(tmp_path / "zh.csv", TRADITIONAL_WINDOWS, "cp950")  # with € and 恒
    with pytest.raises(DataError) as e:
        examples(section(path, encoding="big5"))
    assert f"{path} line 8: not big5 text (byte 0xf9)" in str(e.value)  # 恒, the first row with one
    assert "it decodes as cp950 (Traditional Chinese: Big5 as Windows writes it, e.g. Excel on" in str(
        e.value
    )
    assert len(examples(section(path, encoding="cp950"))) == len(TRADITIONAL_WINDOWS)


def test_a_wrong_data_encoding_names_the_right_one(tmp_path):
    utf8 = write(tmp_path / "d.csv", KOREAN, "utf-8")
    with pytest.raises(DataError) as e:
        examples(section(utf8, encoding="cp932"))
    assert f"{utf8} line 2: not cp932 text" in str(e.value)
    assert "it decodes as utf-8 (the default): set data.encoding: utf-8 in the recipe" in str(e.value)
    korean = write(tmp_path / "ko.csv", KOREAN, "cp949")
    with pytest.raises(DataError, match=r"not cp932 text .*set data.encoding: cp949 in the recipe"):
        examples(section(korean, encoding="cp932"))


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_data_encoding_that_decodes_into_another_script_names_the_right_one(tmp_path, kind):
    # EUC-KR's Hangul decode in EUC-JP without an error, as kanji: 대한민국 reads as 企廃肯厩.
    korean = write(tmp_path / f"ko.{kind}", KOREAN, "euc-kr")
    with pytest.raises(DataError) as e:
        examples(section(korean, encoding="euc-jp"))
    assert f"{korean}: decodes in data.encoding euc-jp without an error, but not into Japanese text" in str(
        e.value
    )
    assert "set data.encoding: cp949 in the recipe" in str(e.value)
    # Text in the encoding's own language passes, however few of its letters are not ASCII.
    assert len(examples(section(korean, encoding="euc-kr"))) == len(KOREAN)
    ascii_only = write(tmp_path / f"en.{kind}", [{"instruction": "Hi?", "output": "Hello."}], "ascii")
    assert len(examples(section(ascii_only, encoding="euc-jp"))) == 1


def test_a_korean_data_encoding_on_chinese_text_that_decodes_names_the_chinese_one(tmp_path):
    # These rows have none of GBK's row 0xC9 (上, 生), which CP949 refuses: CP949 decodes them without an
    # error, into Hangul and Hanja (中国的首都 reads as 櫓벌돨看떼).
    gbk = write(tmp_path / "zh.jsonl", SIMPLIFIED[:2], "gbk")
    assert gbk.read_bytes().decode("cp949")
    with pytest.raises(DataError) as e:
        examples(section(gbk, encoding="cp949"))
    assert f"{gbk}: decodes in data.encoding cp949 without an error, but not into Korean text" in str(e.value)
    assert (
        "it decodes as gb18030 (Simplified Chinese: GB2312, GBK or their superset GB18030, e.g. Excel"
        in str(e.value)
    )
    assert "set data.encoding: gb18030 in the recipe" in str(e.value)


@pytest.mark.parametrize(
    ("rows", "encoding", "given", "named"),
    [
        (KOREAN, "euc-kr", "gb18030", "cp949"),  # all of it common hanzi in GB18030
        (KOREAN, "euc-kr", "gbk", "cp949"),
        (KOREAN[:1], "cp949", "cp950", "cp949"),  # and in CP950
        (JAPANESE, "euc-jp", "gb18030", "euc-jp"),  # GB2312 has the kana of JIS X 0208, where they are
        (JAPANESE, "euc-jp", "cp950", "euc-jp"),  # and Big5 its frequent hanzi
        (JAPANESE[1:], "euc-jp", "big5", "euc-jp"),
    ],
)
def test_a_chinese_data_encoding_on_korean_or_japanese_text_names_theirs(
    tmp_path, rows, encoding, given, named
):
    path = write(tmp_path / "d.csv", rows, encoding)
    assert path.read_bytes().decode(given)
    with pytest.raises(DataError) as e:
        examples(section(path, encoding=given))
    assert f"{path}: decodes in data.encoding {given} without an error, but " in str(e.value)
    assert f"set data.encoding: {named} in the recipe" in str(e.value)


def test_a_chinese_data_encoding_on_korean_text_says_why_it_is_taken_for_korean(tmp_path):
    korean = write(tmp_path / "ko.csv", KOREAN, "euc-kr")
    with pytest.raises(DataError) as e:
        examples(section(korean, encoding="gb18030"))
    assert str(e.value) == (
        f"{korean}: decodes in data.encoding gb18030 without an error, but reads as Korean text in cp949 as "
        "well, and a file that reads as both is taken to be Korean: set data.encoding: cp949 in the recipe "
        "(Korean: EUC-KR or its superset CP949, e.g. Excel on Korean Windows); if it is Simplified Chinese, "
        "save it as UTF-8"
    )


def test_the_encoding_check_judges_by_the_start_of_the_file_even_where_it_cuts_a_character(
    tmp_path, monkeypatch
):
    korean = write(tmp_path / "ko.jsonl", KOREAN, "euc-kr")
    # The sample ends between the two bytes of 서, after the first row's question: still judged.
    monkeypatch.setattr(encodings, "SAMPLE_BYTES", korean.read_bytes().index("서".encode("euc-kr")) + 1)
    with pytest.raises(DataError, match="not into Japanese text"):
        examples(section(korean, encoding="euc-jp"))


@pytest.mark.parametrize("encoding", [None, "utf-8", "UTF8"])
def test_utf8_with_a_byte_order_mark_still_reads(tmp_path, encoding):
    # Excel's "CSV UTF-8" starts with one; it must not become part of the first column's name.
    for kind in KINDS:
        path = tmp_path / f"bom.{kind}"
        path.write_bytes(text_of(KOREAN, kind).encode("utf-8-sig"))
        assert examples(section(path, encoding=encoding)) == examples(section(write(path, KOREAN, "utf-8")))


def recipe_error(data: dict) -> str:
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"model": {"name": "tiny://llama"}, "data": {"format": "text", **data}})
    return str(e.value)


def test_data_encoding_must_be_a_text_encoding_a_data_file_can_be_in():
    unknown = recipe_error({"source": "d.csv", "encoding": "korean-windows"})
    assert "data.encoding: not a text encoding Python knows" in unknown
    assert "utf-8, cp949, euc-kr, cp932, shift_jis, euc-jp" in unknown and "'korean-windows'" in unknown
    assert "data.encoding: not a text encoding" in recipe_error({"source": "d.csv", "encoding": "base64"})
    assert "data.encoding: utf-16 writes ASCII characters as other bytes" in recipe_error(
        {"source": "d.csv", "encoding": "utf-16"}
    )
    parquet = recipe_error({"source": "d.parquet", "encoding": "cp949"})
    assert "data.encoding: applies to .jsonl/.json/.csv files; text in Parquet is UTF-8" in parquet
    for name in (
        "utf-8",
        "cp949",
        "EUC-KR",
        "cp932",
        "shift_jis",
        "euc_jp",
        "gb18030",
        "GBK",
        "big5",
        "cp950",
    ):
        recipe_from_dict(
            {
                "model": {"name": "tiny://llama"},
                "data": {"source": "d.csv", "format": "text", "encoding": name},
            }
        )


def test_a_hub_dataset_gets_data_encoding_only_when_set(tmp_path, monkeypatch):
    # `datasets` reads a hub repository of CSV or JSON files with it; its Parquet reader takes none.
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(KOREAN), parquet)
    given = []
    load_parquet = datasets.load_dataset

    def load_dataset(source, *, name, split, revision, **options):  # the hub repository holds d.parquet
        given.append(options)
        return load_parquet("parquet", data_files=str(parquet), split=split, **options)

    monkeypatch.setattr(sources.datasets, "load_dataset", load_dataset)
    assert [r.value for r in sources.read_rows("org/ko-data")] == KOREAN
    with pytest.raises(DataError) as e:
        sources.read_rows("org/ko-data", encoding="cp949")
    assert given == [{}, {"encoding": "cp949"}]
    assert "org/ko-data: data.encoding (cp949) applies to CSV and JSON files" in str(e.value)
    assert "remove data.encoding" in str(e.value)


def test_validate_names_the_encoding_of_a_cp949_csv_and_reads_it_once_set(tmp_path):
    data = write(tmp_path / "ko.csv", KOREAN, "cp949")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{name: tiny://llama}}\ndata: {{source: {data}, format: instruction, template: koalpaca}}\n",
        encoding="utf-8",
    )
    refused = cli_in_process("validate", "--recipe", str(recipe))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{data} line 2: not UTF-8 text (byte 0x" in refused.stderr
    assert "set data.encoding: cp949 in the recipe" in refused.stderr
    ok = cli_in_process("validate", "--recipe", str(recipe), "--set", "data.encoding=cp949")
    assert ok.returncode == 0, ok.stderr
    assert f"{data}: 3 training rows, all well-formed" in ok.stdout


def test_data_encoding_applies_to_the_validation_file_too(tmp_path):
    train = write(tmp_path / "train.csv", KOREAN, "cp949")
    held_out = write(tmp_path / "held_out.jsonl", KOREAN[:2], "cp949")
    cfg = section(train, encoding="cp949", validation={"file": str(held_out)})
    rows = read_examples(cfg, resolve_template("koalpaca"))
    assert [e.as_json() for e in rows.eval] == examples(
        section(write(tmp_path / "u.csv", KOREAN[:2], "utf-8"))
    )


def test_validation_encoding_reads_a_validation_file_in_another_encoding_than_data_encoding(tmp_path):
    train = write(tmp_path / "train.csv", KOREAN, "cp949")
    held_out = write(tmp_path / "held_out.jsonl", SIMPLIFIED, "gbk")  # from elsewhere
    cfg = section(train, encoding="cp949", validation={"file": str(held_out), "encoding": "gb18030"})
    rows = read_examples(cfg, resolve_template("koalpaca"))
    assert [e.as_json() for e in rows.eval] == examples(
        section(write(tmp_path / "u.csv", SIMPLIFIED, "utf-8"))
    )
    assert [e.as_json() for e in rows.train] == examples(section(write(tmp_path / "k.csv", KOREAN, "utf-8")))


def test_a_validation_file_that_does_not_decode_names_validation_encoding(tmp_path):
    train = write(tmp_path / "train.csv", KOREAN, "utf-8")
    held_out = write(tmp_path / "held_out.csv", TRADITIONAL, "big5")
    with pytest.raises(DataError) as e:
        examples(section(train, validation={"file": str(held_out)}))
    assert f"{held_out} line 2: not UTF-8 text" in str(e.value)
    assert "set data.validation.encoding: cp950 in the recipe" in str(e.value)

    # data.encoding applies to it unless validation.encoding is given, and is checked as that.
    train = write(tmp_path / "train.csv", KOREAN, "cp949")
    gbk = write(tmp_path / "held_out.jsonl", SIMPLIFIED[:2], "gbk")  # decodes in CP949, as Hangul
    with pytest.raises(DataError) as e:
        read_examples(
            section(train, encoding="cp949", validation={"file": str(gbk)}), resolve_template("koalpaca")
        )
    assert f"{gbk}: decodes in data.validation.encoding cp949 without an error, but not into Korean" in str(
        e.value
    )
    assert "set data.validation.encoding: gb18030 in the recipe" in str(e.value)


def test_validation_encoding_is_checked_as_data_encoding_is():
    validation = {"source": "d.csv", "encoding": "cp949"}
    unknown = recipe_error({**validation, "validation": {"file": "v.csv", "encoding": "big-five"}})
    assert "data.validation.encoding: not a text encoding Python knows" in unknown
    parquet = recipe_error({**validation, "validation": {"file": "v.parquet", "encoding": "cp950"}})
    assert "data.validation.encoding: applies to .jsonl/.json/.csv files" in parquet
    assert "remove data.validation.encoding" in parquet
    for split in ({"fraction": 0.1}, {"split": "test"}):
        message = recipe_error({**validation, "validation": {**split, "encoding": "cp950"}})
        assert "data.validation: encoding applies to validation.file; a " in message
        assert "of data.source is read with data.encoding" in message
