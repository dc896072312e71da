"""tools/make_shards.py: every input kind becomes the same records; bad rows are skipped, counted by reason and
listed; output is deterministic (whatever the worker count) and an interrupted run resumes without rewriting
finished shards."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from make_data import BROKEN_ROWS, good_rows, image_bytes, write_caption_folder, write_images, write_tar

from vlp.data import ingest_inputs, records, shard_writer, sources

sys.path.insert(0, str(REPO / "tools"))
import make_shards  # noqa: E402


def read_split(out, split="train"):
    source = sources.make_source(f"arrayrecord:{out}", split, 16)
    return [source[i] for i in range(len(source))]


def csv_args(root, out, workers=1):
    return [f"--captions={root / 'captions.csv'}", f"--images_root={root / 'images'}", f"--out={out}", "--shard_size=5",
            f"--workers={workers}"]


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv")
    write_caption_folder(root)
    out = root / "shards"
    code = make_shards.main(csv_args(root, out))
    return root, out, code


def test_each_bad_row_is_skipped_and_counted_by_reason(csv_run):
    root, out, code = csv_run
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["splits"]["train"]
    assert code == 0
    assert entry["num_input_rows"] == 12 + len(BROKEN_ROWS) and entry["num_records"] == 12
    assert entry["skipped"] == {reason: 1 for _, _, reason in BROKEN_ROWS}
    report = [json.loads(line) for line in (out / "train-skipped.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in report] == [reason for _, _, reason in BROKEN_ROWS]
    assert [r["row"] for r in report] == list(range(12, 12 + len(BROKEN_ROWS)))
    assert report[3]["where"].endswith("captions.csv:17")  # line 17: header + 12 good rows + 3 broken before it


def test_records_keep_images_captions_and_labels(csv_run):
    root, out, _ = csv_run
    rows = good_rows(12)
    got = read_split(out)
    assert [r["caption_noisy"] for r in got] == [r["caption"] for r in rows]
    assert [r["caption_synthetic"] for r in got] == [r["caption_synthetic"] for r in rows]
    assert [r["label"] for r in got] == [r["label"] for r in rows] and [r["index"] for r in got] == list(range(12))
    expected = np.asarray(records.decode_image((root / "images" / rows[3]["path"]).read_bytes()))
    np.testing.assert_array_equal(got[3]["image"], expected)  # the original bytes, not a re-encode
    assert got[3]["image"].shape == (20, 24, 3) and got[3]["image"].dtype == np.uint8


def test_manifest_checksums_match_the_shards(csv_run):
    import hashlib

    _, out, _ = csv_run
    shards = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert [s["num_records"] for s in shards] == [5, 5, 2, 0]  # rows 12-16 (all broken) leave an empty shard
    for shard in shards:
        assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]


def test_rerun_resumes_and_output_is_deterministic_across_worker_counts(csv_run, tmp_path):
    root, out, _ = csv_run
    first = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]
    # An interrupted run: shard 1 never finished (no sidecar). The rerun rewrites only that shard.
    (out / first[1]["file"]).unlink()
    (out / (first[1]["file"] + ".json")).unlink()
    kept = (out / first[0]["file"]).stat().st_mtime_ns
    assert make_shards.main(csv_args(root, out)) == 0
    assert (out / first[0]["file"]).stat().st_mtime_ns == kept
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"] == first
    # Two worker processes write the same bytes.
    other = tmp_path / "two_workers"
    assert make_shards.main(csv_args(root, other, workers=2)) == 0
    assert json.loads((other / "manifest.json").read_text())["splits"]["train"]["shards"] == first


def test_verify_finds_a_damaged_shard(csv_run, tmp_path, capsys):
    import shutil

    _, out, _ = csv_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert make_shards.main(["--verify", f"--out={copy}"]) == 0
    shard = copy / "train-00001-of-00004.array_record"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (copy / "train-00002-of-00004.array_record").unlink()
    capsys.readouterr()
    assert make_shards.main(["--verify", f"--out={copy}"]) == 1
    assert json.loads(capsys.readouterr().out)["problems"] == [
        "train: train-00001-of-00004.array_record does not match its checksum (damaged or rewritten)",
        "train: train-00002-of-00004.array_record is missing"]


def test_jsonl_keeps_every_caption_of_an_image(tmp_path):
    rows = good_rows(4)
    write_images(tmp_path, rows)
    lines = [json.dumps({"file_name": r["path"], "captions": [f"{r['caption']} take {k}" for k in range(5)]})
             for r in rows]
    (tmp_path / "coco.jsonl").write_text("\n".join(lines + ["{not json"]) + "\n")
    entry = shard_writer.write_shards(ingest_inputs.CaptionFileInput(str(tmp_path / "coco.jsonl")),
                                      str(tmp_path / "out"))
    assert entry["num_records"] == 4 and entry["skipped"] == {"bad_row": 1} and entry["max_captions"] == 5
    got = read_split(tmp_path / "out")
    assert got[2]["captions"] == [f"a photo number 2 take {k}" for k in range(5)]
    assert got[2]["caption_noisy"] == got[2]["caption_synthetic"] == "a photo number 2 take 0"  # no second caption
    assert got[2]["label"] == -1
    assert sources.has_synthetic_captions(f"arrayrecord:{tmp_path / 'out'}") is False


def test_tar_and_parquet_inputs_give_the_same_records_as_csv(csv_run, tmp_path):
    _, csv_out, _ = csv_run
    rows = good_rows(12)
    write_tar(tmp_path / "a.tar", rows[:7])
    write_tar(tmp_path / "b.tar", rows[7:], first=7)
    assert make_shards.main(["--tar", str(tmp_path / "*.tar"), f"--out={tmp_path / 'tar'}", "--workers=1"]) == 0
    write_images(tmp_path / "images", rows)
    table = {"key": [f"{i:06d}" for i in range(12)], "caption": [r["caption"] for r in rows],
             "caption_synthetic": [r["caption_synthetic"] for r in rows], "label": [r["label"] for r in rows]}
    pq.write_table(pa.table(dict(table, jpg=[image_bytes(i, "PNG" if r["path"].endswith("png") else "JPEG")
                                            for i, r in enumerate(rows)])), tmp_path / "bytes.parquet",
                   row_group_size=5)
    pq.write_table(pa.table(dict(table, path=[r["path"] for r in rows])), tmp_path / "paths.parquet")
    assert make_shards.main(["--parquet", str(tmp_path / "bytes.parquet"), f"--out={tmp_path / 'pb'}"]) == 0
    assert make_shards.main(["--parquet", str(tmp_path / "paths.parquet"), f"--images_root={tmp_path / 'images'}",
                             f"--out={tmp_path / 'pp'}"]) == 0
    reference = read_split(csv_out)
    for out in ("tar", "pb", "pp"):
        got = read_split(tmp_path / out)
        assert len(got) == 12
        for a, b in zip(got, reference, strict=True):
            assert (a["caption_noisy"], a["caption_synthetic"], a["label"]) == \
                (b["caption_noisy"], b["caption_synthetic"], b["label"])
            np.testing.assert_array_equal(a["image"], b["image"])


def test_class_folders_write_class_names_for_zero_shot(tmp_path):
    for c, name in enumerate(["sea_lake", "forest", "river"]):
        (tmp_path / "in" / name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "in" / name / f"{i}.jpg").write_bytes(image_bytes(10 * c + i))
    assert make_shards.main([f"--class_folders={tmp_path / 'in'}", "--split=validation",
                             f"--out={tmp_path / 'out'}"]) == 0
    spec = f"arrayrecord:{tmp_path / 'out'}"
    assert sources.class_names(spec) == ("forest", "river", "sea_lake") and sources.split_names(spec) == ("validation",)
    got = read_split(tmp_path / "out", "validation")
    assert [(r["label"], r["caption_noisy"]) for r in got] == [(0, "forest")] * 2 + [(1, "river")] * 2 + \
        [(2, "sea lake")] * 2
    assert sources.class_prompts(spec, "sea_lake")[0] == "a photo of a sea lake."


def test_nothing_valid_exits_non_zero_and_help_works(tmp_path):
    (tmp_path / "bad.csv").write_text("path,caption\nmissing.jpg,a caption\n")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), f"--captions={tmp_path}/bad.csv",
                             f"--out={tmp_path / 'out'}"], capture_output=True, text=True, cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1, result.stderr
    assert "no valid record was written" in result.stderr and '"missing_file": 1' in result.stdout
    with pytest.raises(SystemExit) as exit_info:
        make_shards.main(["--help"])
    assert exit_info.value.code == 0
    (tmp_path / "x.csv").write_text("file,words\na.jpg,b\n")
    with pytest.raises(ValueError, match="needs a path column"):
        make_shards.main([f"--captions={tmp_path / 'x.csv'}", f"--out={tmp_path / 'o'}"])


def test_tokenizer_trains_on_the_captions_of_shards(csv_run, tmp_path):
    import train_tokenizer

    from vlp.data.tokenizer import Tokenizer

    _, out, _ = csv_run
    rows = good_rows(12)
    assert sources.all_captions(f"arrayrecord:{out}") == [t for r in rows for t in (r["caption"],
                                                                                     r["caption_synthetic"])]
    model = train_tokenizer.main([f"--source=arrayrecord:{out}", f"--out={tmp_path / 'tok'}", "--vocab_size=48"])
    tokenizer = Tokenizer(model)
    assert tokenizer.vocab_size == 48
    ids = tokenizer.encode(["a detailed synthetic caption of photo 7"], 64)  # 48 pieces: many per word
    assert tokenizer.decode(ids[0]) == "a detailed synthetic caption of photo 7"
