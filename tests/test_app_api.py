"""The demo's API through gradio_client, against the app started as the README says (python demo/app.py)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from demo_support import running_app, save_tiny_checkpoint

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
    with running_app("--checkpoint", str(checkpoint), "--device", "cpu") as url:
        yield gradio_client.Client(url, verbose=False, download_files=False)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 900x600 JPEG the app has never seen: noise with a blue square and a yellow disc."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(60, 200, size=(600, 900, 3), dtype=np.uint8)
    pixels[100:250, 150:300] = (30, 60, 220)
    yy, xx = np.mgrid[:600, :900]
    pixels[(yy - 400) ** 2 + (xx - 650) ** 2 < 90 ** 2] = (240, 210, 20)
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    return path


def test_describe_two_boxes_three_phrases(client, photo):
    phrases = ["a blue square", "a yellow disc", "noise"]
    out = client.predict(image=gradio_client.handle_file(str(photo)),
                         boxes="[[150, 100, 300, 250], [560, 310, 740, 490]]", phrases=", ".join(phrases),
                         api_name="/describe")
    assert out["model"]["random_weights"] is False and out["image_size"] == [900, 600]
    assert [r["box"] for r in out["regions"]] == [[150, 100, 300, 250], [560, 310, 740, 490]]
    for region in out["regions"]:
        views = region["views"]
        assert all(len(v["hash_hex"]) == 16 and int(v["hash_hex"], 16) >= 0 for v in views)
        assert all(isinstance(v["score"], float) for v in views)
        assert len(views) == 11 and [v["t"] for v in views] == pytest.approx([0.1 * k for k in range(11)])  # t=0 + ten
        assert sum(v["selected"] for v in views) == 3
        assert region["caption"].strip() and region["tags"]
        assert [s["phrase"] for s in region["similarity"]] == phrases
        assert {"views", "vision", "caption"} <= set(region["timings"])


def test_plan_views_alone(client, photo):
    image = gradio_client.handle_file(str(photo))
    out = client.predict(image=image, boxes="[[150, 100, 300, 250]]", api_name="/plan_views")
    region = out["regions"][0]
    assert out["image_size"] == [900, 600] and region["image_size"] == [900, 600]
    assert [c["t"] for c in region["candidates"]] == pytest.approx([0.1 * k for k in range(1, 11)])
    assert len(region["selected_ts"]) == 3 and region["selected_ts"][0] == 0.0
    fixed = client.predict(image=image, boxes="[[150, 100, 300, 250]]", strategy="fixed", ts="0.5, 1.0",
                           api_name="/plan_views")
    assert fixed["regions"][0]["selected_ts"] == [0.0, 0.5, 1.0]


def test_errors_are_explained_and_the_app_keeps_serving(client, photo, tmp_path):
    image = gradio_client.handle_file(str(photo))
    with pytest.raises(Exception, match=r"Box 2 \(10, 10, 10, 80\)"):
        client.predict(image, "[[150, 100, 300, 250], [10, 10, 10, 80]]", "", api_name="/describe")
    with pytest.raises(Exception, match="not valid JSON"):
        client.predict(image, "[[150, 100", "", api_name="/describe")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(Exception, match="Could not read the image"):
        client.predict(gradio_client.handle_file(str(broken)), "[[1, 1, 5, 5]]", "", api_name="/describe")
    out = client.predict(image, "[[150, 100, 300, 250]]", "a blue square", api_name="/describe")
    assert len(out["regions"]) == 1 and out["regions"][0]["caption"].strip()


def test_concurrent_users_are_queued_not_dropped(client, photo):
    image = gradio_client.handle_file(str(photo))
    jobs = [client.submit(image=image, boxes=f"[[{10 * k}, 10, {10 * k + 200}, 210]]", phrases="noise",
                          api_name="/describe") for k in range(3)]
    boxes = [job.result(timeout=120)["regions"][0]["box"] for job in jobs]
    assert boxes == [[10.0 * k, 10.0, 10.0 * k + 200, 210.0] for k in range(3)]


def test_describe_all_proposes_and_describes_every_region(client, photo):
    """/describe_all with the bundled proposer (the app's default): every region has a caption, a box inside the
    image and a confidence, best first."""
    out = client.predict(image=gradio_client.handle_file(str(photo)), phrases="a blue square", max_regions=5,
                         api_name="/describe_all")
    assert out["proposer"] == "checkpoints/proposer" and out["image_size"] == [900, 600]
    regions = out["regions"]
    assert 1 <= len(regions) <= 5
    for r in regions:
        x1, y1, x2, y2 = r["box"]
        assert 0 <= x1 < x2 <= 900 and 0 <= y1 < y2 <= 600
        assert r["caption"].strip() and 0 < r["objectness"] <= 1
        assert r["confidence"] == pytest.approx(r["caption_score"] * r["objectness"], rel=1e-5)
        assert [s["phrase"] for s in r["similarity"]] == ["a blue square"]
    confidences = [r["confidence"] for r in regions]
    assert confidences == sorted(confidences, reverse=True)
