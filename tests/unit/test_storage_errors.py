"""Storage failures the data stage must report clearly: access denied to a source is one line naming the source
(and the S3 bucket), never skipped as if it were a missing path, never counted as a corrupt file. And the storage
settings a Ray task takes from the driver do not outlive the task."""

import json
import os

import pytest

from llm_platform import storage
from llm_platform.data import sources
from llm_platform.errors import DataError

SPEC = sources.ReadSpec(kind="pretrain", text_field="text", prompt_field="prompt", response_field="response",
                        text_unit="file", max_record_bytes=1000, on_error="skip")


def deny(*args, **kwargs):
    raise PermissionError("Access Denied")


def test_a_bucket_that_refuses_listing_fails_naming_the_pattern_and_bucket(monkeypatch, tmp_path):
    readable = tmp_path / "ok.jsonl"
    readable.write_text(json.dumps({"text": "fine"}) + "\n")
    monkeypatch.setattr(storage, "files_info", deny)
    monkeypatch.setattr(storage, "exists", lambda uri: not uri.startswith("s3://"))  # no object named "*.jsonl"
    # A readable source next to the refused one does not turn the refusal into a skipped source.
    with pytest.raises(DataError) as raised:
        sources.list_inputs([str(readable), "s3://secret-corpus/raw/*.jsonl"])
    message = str(raised.value)
    assert message.startswith("s3://secret-corpus/raw/*.jsonl: access denied to S3 bucket 'secret-corpus'")
    assert "Access Denied" in message and "s3:ListBucket" in message and "\n" not in message


def test_an_object_that_refuses_reading_fails_naming_the_file(monkeypatch):
    # A source naming one object (no listing: its size and marker come from a HEAD, which is refused).
    monkeypatch.setattr(storage, "exists", lambda uri: True)
    monkeypatch.setattr(storage, "isdir", lambda uri: False)

    def info(uri):
        if uri.endswith("b.jsonl"):
            raise PermissionError("Forbidden")
        return {"uri": uri, "size": 10, "marker": "etag"}

    monkeypatch.setattr(storage, "info", info)
    with pytest.raises(DataError) as raised:
        sources.list_inputs(["s3://corpus/raw/a.jsonl", "s3://corpus/raw/b.jsonl"])
    assert str(raised.value).startswith("s3://corpus/raw/b.jsonl: access denied to S3 bucket 'corpus' (Forbidden)")


def test_a_missing_path_is_still_reported_not_raised(tmp_path):
    inputs, missing = sources.list_inputs([str(tmp_path / "nothing-here" / "*.jsonl")])
    assert inputs == [] and missing[0]["reason"].startswith("missing_path")


@pytest.mark.parametrize("uri, where", [("s3://corpus/raw/a.jsonl", "to S3 bucket 'corpus'"),
                                        ("/data/raw/a.jsonl", "by the file system")])
def test_access_denied_while_reading_is_an_error_not_a_corrupt_file(monkeypatch, uri, where):
    # Listing was allowed, reading is not (a policy that changed in between, or a key-level rule): the file has
    # no bad content, so `data.on_error=skip` must not turn it into a `corrupt_file` record.
    monkeypatch.setattr(storage, "open_read", deny)
    meta = {"uri": uri, "format": "jsonl", "compression": None, "size": 10, "marker": ""}
    with pytest.raises(DataError) as raised:
        list(sources.read_file(meta, 0, SPEC))
    assert str(raised.value).startswith(f"{uri}: access denied {where} (Access Denied)")


def test_a_corrupt_file_is_still_a_skipped_record(monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("truncated stream")

    monkeypatch.setattr(storage, "open_read", broken)
    meta = {"uri": "s3://corpus/raw/a.jsonl", "format": "jsonl", "compression": None, "size": 10, "marker": ""}
    [record] = sources.read_file(meta, 0, SPEC)
    assert record["drop_reason"] == "corrupt_file" and "truncated stream" in record["detail"]


def test_task_storage_settings_are_restored_after_the_task(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1111")
    before = storage.settings()
    driver = {**before, "endpoint_url": "http://127.0.0.1:2222", "retries": 3}
    with storage.using(driver):
        assert storage.endpoint_url() == "http://127.0.0.1:2222"
        assert storage.s3_options()["config_kwargs"]["retries"]["max_attempts"] == 3
        assert storage.pyarrow_filesystem("s3://b/k")[0].llmp_options["endpoint_override"] == "http://127.0.0.1:2222"
    assert storage.settings() == before
    assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1111"
