"""An OCI layout is untrusted input: odd blobs and JSON of the wrong shape are clear errors."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from layerkit import file, make_image
from oci2disk.errors import ImageError
from oci2disk.oci.layout import blob_path, open_layout
from oci2disk.rootfs.flatten import flatten


def _call_with_timeout(fn: object, seconds: float = 20) -> BaseException | None:
    """Run ``fn`` in a thread; a hang fails the test instead of hanging it."""
    result: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()  # type: ignore[operator]
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "hung"
    return result[0]


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_layer_blob_that_is_not_a_file_is_refused_without_a_hang(
    tmp_path: Path, kind: str
) -> None:
    image = make_image(tmp_path / "oci", [[file("etc/hostname", b"x\n")]])
    blob = blob_path(image.layout, image.layers[0].digest)
    blob.unlink()
    if kind == "fifo":
        os.mkfifo(blob)
    else:
        blob.mkdir()
    error = _call_with_timeout(lambda: flatten(image, tmp_path / "work"))
    assert isinstance(error, ImageError)
    assert image.layers[0].digest in str(error)
    assert ("not a regular file" if kind == "fifo" else "is a directory") in str(error)


@pytest.mark.parametrize(
    ("index", "problem"),
    [
        ([1, 2], "expected a JSON object, found list"),
        ({"manifests": {"a": 1}}, "manifests: expected a JSON array, found dict"),
        ({"manifests": ["x"]}, "manifests[0]: expected a JSON object, found str"),
        ({"manifests": [{"digest": 5, "size": 1}]}, "malformed descriptor"),
    ],
)
def test_index_json_of_the_wrong_shape_is_a_clear_error(
    tmp_path: Path, index: object, problem: str
) -> None:
    make_image(tmp_path / "oci", [[file("a", b"")]])
    (tmp_path / "oci" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match=r"index\.json") as caught:
        open_layout(tmp_path / "oci")
    assert problem in str(caught.value)
