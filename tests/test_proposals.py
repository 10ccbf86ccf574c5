"""Box proposals: the shared clean-up, recall, the three proposers, the proposer's training and the bundled one."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynrefer_core.data.annotations import load_annotations
from dynrefer_core.proposals import (
    FileProposals,
    Proposals,
    SamProposer,
    TrainedProposer,
    box_recall,
    load_proposer,
    masks_to_proposals,
    postprocess,
)
from dynrefer_core.proposer_train import _augment, choose_threshold, load_proposer_config, train

ROOT = Path(__file__).resolve().parents[1]


def _check(p: Proposals, width: int, height: int, cap: int) -> None:
    assert p.boxes.shape == (len(p), 4) and p.scores.shape == (len(p),)
    assert 0 < len(p) <= cap
    assert (p.boxes[:, 0] >= 0).all() and (p.boxes[:, 1] >= 0).all()
    assert (p.boxes[:, 2] <= width).all() and (p.boxes[:, 3] <= height).all()
    assert (p.boxes[:, 2] > p.boxes[:, 0]).all() and (p.boxes[:, 3] > p.boxes[:, 1]).all()
    assert torch.equal(p.scores, p.scores.sort(descending=True).values)


# ------------------------------------------------------------------------------------ clean-up and recall


def test_postprocess_clips_drops_suppresses_sorts_and_caps():
    boxes = torch.tensor([[-5., -5, 20, 20],     # clipped to 0..20
                          [0, 0, 21, 21],        # IoU ~0.9 with the first, lower score: suppressed
                          [50, 50, 51, 80],      # 1 px wide: dropped
                          [60, 60, 90, 90],
                          [30, 70, 130, 110]])   # clipped to x2 = 100
    scores = torch.tensor([0.9, 0.8, 0.99, 0.5, 0.7])
    p = postprocess(boxes, scores, size=(100, 100), nms_iou=0.5, min_size=2.0, max_proposals=None)
    assert p.boxes.tolist() == [[0, 0, 20, 20], [30, 70, 100, 100], [60, 60, 90, 90]]
    assert p.scores.tolist() == pytest.approx([0.9, 0.7, 0.5])
    capped = postprocess(boxes, scores, size=(100, 100), nms_iou=0.5, max_proposals=2)
    assert capped.boxes.tolist() == p.boxes[:2].tolist()
    no_nms = postprocess(boxes, scores, size=None, nms_iou=None, score_threshold=0.6, max_proposals=None)
    assert no_nms.scores.tolist() == pytest.approx([0.9, 0.8, 0.7])  # threshold, no suppression, no clipping
    assert no_nms.boxes[0].tolist() == [-5, -5, 20, 20]


def test_proposals_refuses_mismatched_lengths_and_round_trips_as_rows():
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        Proposals(torch.zeros(2, 4), torch.zeros(1))
    p = Proposals([[1, 2, 3, 4]], [0.5])
    assert p.to_list() == [[1.0, 2.0, 3.0, 4.0, 0.5]] and len(Proposals(torch.zeros(0, 4), [])) == 0


def test_masks_to_proposals_gives_pixel_edge_boxes_and_drops_empty_masks():
    masks = np.zeros((3, 10, 12), bool)
    masks[0, 2:5, 3:9] = True   # rows 2-4, columns 3-8
    masks[2, 7, 11] = True      # one pixel
    p = masks_to_proposals(masks, [0.3, 0.9, 0.6])
    assert p.boxes.tolist() == [[3, 2, 9, 5], [11, 7, 12, 8]]
    assert p.scores.tolist() == pytest.approx([0.3, 0.6])
    with pytest.raises(ValueError, match="one score each"):
        masks_to_proposals(masks, [0.1])


def test_box_recall_on_a_hand_made_case():
    truths = [torch.tensor([[0., 0, 10, 10], [20, 20, 40, 40]]), torch.tensor([[0., 0, 100, 100]])]
    props = [torch.tensor([[50., 50, 60, 60], [0, 0, 10, 12], [21, 21, 40, 40]]),  # IoU 0.83 and 0.90
             torch.tensor([[0., 0, 100, 45]])]                                      # IoU 0.45: a miss
    assert box_recall(props, truths) == pytest.approx(2 / 3)
    assert box_recall(props, truths, max_proposals=2) == pytest.approx(1 / 3)  # the third box is cut
    assert box_recall(props, truths, iou=0.85) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no ground-truth"):
        box_recall([torch.zeros(0, 4)], [torch.zeros(0, 4)])


def test_choose_threshold_takes_the_highest_within_tolerance():
    assert choose_threshold({"0": 0.96, "0.1": 0.959, "0.2": 0.95, "0.3": 0.9}, 0.002) == 0.1
    assert choose_threshold({"0": 0.5, "0.1": 0.6}, 0.0) == 0.1


# ------------------------------------------------------------------------------------------------- files


def test_plain_file_proposals_look_up_by_path_or_name_sort_clip_and_cap(tmp_path):
    Image.new("RGB", (50, 40)).save(tmp_path / "a.jpg")
    path = tmp_path / "props.json"
    path.write_text(json.dumps({"a.jpg": [[1, 1, 10, 10, 0.2], [5, 5, 70, 30, 0.9], [0, 0, 8, 8, 0.5]]}))
    props = FileProposals(path)
    for image in (tmp_path / "a.jpg", str(tmp_path / "a.jpg"), Image.open(tmp_path / "a.jpg")):
        p = props(image)
        assert p.boxes.tolist() == [[5, 5, 50, 30], [0, 0, 8, 8], [1, 1, 10, 10]]  # x2 clipped to the width
        assert p.scores.tolist() == pytest.approx([0.9, 0.5, 0.2])
    assert len(load_proposer(f"file:{path}", max_proposals=1)("elsewhere/a.jpg")) == 1  # by file name
    assert len(FileProposals(path, nms_iou=0.5)(tmp_path / "a.jpg")) == 2  # the 0.2 box overlaps the 0.5 one


def test_grit_file_proposals_read_the_release_layout(tmp_path):
    grit = {"dataset": {"description": "GRiT boxes"},
            "images": [{"id": 7, "file_name": "vg/1.jpg", "width": 100, "height": 80},
                       {"id": 8, "file_name": "vg/2.jpg", "width": 100, "height": 80}],
            "annotations": [
                {"id": 1, "image_id": 7, "caption": "", "bbox": [10, 10, 30, 40],
                 "extra_info": {"grit_result": {"score": 0.4, "noun": "man"}}},
                {"id": 2, "image_id": 7, "caption": "", "bbox": [0, 0, 1, 1],
                 "segmentation": [[50, 20, 120, 20, 120, 60, 50, 60]],  # the polygon wins, as for GT files
                 "extra_info": {"grit_result": {"score": 0.8, "noun": "dog"}}}]}
    path = tmp_path / "test_grit.json"
    path.write_text(json.dumps(grit))
    p = FileProposals(path)("vg/1.jpg")
    assert p.boxes.tolist() == [[50, 20, 100, 60], [10, 10, 30, 40]]  # clipped to the file's width
    assert p.scores.tolist() == pytest.approx([0.8, 0.4])
    assert len(FileProposals(path)("vg/2.jpg")) == 0  # an image without boxes has none


def test_file_proposals_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        FileProposals(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FileProposals(tmp_path / "bad.json")
    (tmp_path / "rows.json").write_text(json.dumps({"a.jpg": [[1, 2, 3, 4]]}))
    with pytest.raises(ValueError, match=r"\[x1, y1, x2, y2, score\] rows"):
        FileProposals(tmp_path / "rows.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        FileProposals(tmp_path / "list.json")
    (tmp_path / "gt.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [
        {"id": 1, "image_id": 1, "bbox": [0, 0, 5, 5], "caption": "a"}]}))
    with pytest.raises(ValueError, match="not a GRiT proposal file"):
        FileProposals(tmp_path / "gt.json")
    (tmp_path / "ok.json").write_text(json.dumps({"a.jpg": []}))
    props = FileProposals(tmp_path / "ok.json")
    with pytest.raises(ValueError, match="'b.jpg' is not in the proposal file"):
        props("b.jpg")
    with pytest.raises(ValueError, match="pass the image's path, not a ndarray"):
        props(np.zeros((4, 4, 3), np.uint8))


def test_load_proposer_refuses_an_unknown_spec(tmp_path):
    with pytest.raises(ValueError, match="expected a trained proposer folder"):
        load_proposer(tmp_path / "nothing")
    with pytest.raises(ValueError, match="config.json is missing"):
        load_proposer(tmp_path)


# --------------------------------------------------------------------------------------------------- SAM


def _tiny_sam(folder: Path) -> None:
    """A random SAM at 128 px input (1 vision layer, 32 channels) with its processor, saved to `folder`."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor
    from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    size = 128
    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=1, num_attention_heads=2,
                             image_size=size, patch_size=16, mlp_dim=64, global_attn_indexes=[0], window_size=4,
                             num_pos_feats=16)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=size, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64,
                                   iou_head_hidden_dim=32)
    torch.manual_seed(0)
    # a wide init spreads the random masks over the image, so that they give different boxes
    config = SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict(), initializer_range=1.0)
    SamModel(config).save_pretrained(folder)
    processor = SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size},
                                  mask_size={"longest_edge": size // 4},
                                  mask_pad_size={"height": size // 4, "width": size // 4})
    SamProcessor(image_processor=processor).save_pretrained(folder)


def test_sam_proposer_with_a_tiny_random_sam(tmp_path):
    _tiny_sam(tmp_path / "sam")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 150, 3), dtype=np.uint8))
    # random weights: no mask passes SAM's quality filters, so they are off; 16 points x 3 masks = 48 masks
    sam = load_proposer(f"sam:{tmp_path / 'sam'}", points_per_side=4, points_per_batch=8, pred_iou_thresh=-1e9,
                        stability_score_thresh=-1e9, nms_iou=None, max_proposals=5, device="cpu")
    assert isinstance(sam, SamProposer)
    p = sam(image)
    _check(p, 150, 90, cap=5)
    assert len(p) == 5
    suppressed = SamProposer(tmp_path / "sam", points_per_side=4, pred_iou_thresh=-1e9, stability_score_thresh=-1e9,
                             nms_iou=0.3, max_proposals=50, device="cpu")(image)
    iou = __import__("torchvision").ops.box_iou(suppressed.boxes, suppressed.boxes).fill_diagonal_(0)
    assert (iou <= 0.3).all()  # after NMS no two boxes overlap more than its threshold
    with pytest.raises(ValueError, match="cannot load SAM"):
        SamProposer(tmp_path / "no-sam", device="cpu")


# ----------------------------------------------------------------------------------------------- training


def test_augment_moves_the_boxes_with_the_pixels():
    img = torch.zeros(3, 40, 60)
    img[:, 5:15, 20:50] = 1.0  # rows 5-14, columns 20-49
    box = torch.tensor([[20., 5, 50, 15]])
    rng = random.Random(0)
    for _ in range(12):
        out, moved = _augment(img, box, rng)
        ys, xs = torch.nonzero(out[0] > 0, as_tuple=True)
        assert moved.tolist() == [[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]]


def test_config_refuses_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config keys \['train.max_step'\]"):
        load_proposer_config(None, ["train.max_step=3"])
    with pytest.raises(ValueError, match="unknown proposer net keys"):
        load_proposer_config(None, ["net.chanels=[8]"])
    cfg = load_proposer_config(ROOT / "configs" / "proposer.yaml", ["train.lr=1e-3"])
    assert cfg.train.lr == 1e-3 and cfg.eval.max_proposals == 30


def test_a_few_training_steps_write_a_folder_the_trained_proposer_loads(scenes, tmp_path):
    out = tmp_path / "proposer"
    cfg = load_proposer_config(ROOT / "configs" / "proposer.yaml", [
        f"data.annotations={scenes}", "data.generate=null", "data.unseen_annotations=null", "data.val_images=1",
        f"out_dir={out}", "train.max_steps=3", "train.batch_size=2", "train.warmup_steps=1", "train.log_every=1",
        "train.eval_every=2", "train.max_minutes=0", "train.threads=1",
        "net={channels: [8, 8, 16, 16, 32], fpn_channels: 32}"])
    report = train(cfg)
    assert report["trained"]["steps"] == 3 and report["chosen"]["step"] in (2, 3)
    assert 0.0 <= report["val_recall_at_chosen"] <= 1.0 and report["val"]["images"] == 1
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r for r in log if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in losses)
    assert json.loads((out / "eval.json").read_text())["chosen"] == report["chosen"]
    proposer = load_proposer(out, max_proposals=7, score_threshold=0.0)
    assert isinstance(proposer, TrainedProposer)
    assert proposer.net.backbone.out_channels == 32  # the folder's own net shape, not the defaults
    image = next(iter(load_annotations(scenes).images.values())).path
    p = proposer(image)
    _check(p, 384, 384, cap=7)
    crop = Image.open(image).crop((0, 0, 300, 200))  # another size: boxes come back in its pixels
    _check(proposer(crop), 300, 200, cap=7)


def test_bundled_proposer_finds_the_objects_of_unseen_scenes(scenes):
    folder = ROOT / "checkpoints" / "proposer"
    assert (folder / "model.safetensors").stat().st_size <= 20 * 2**20
    proposer = load_proposer(folder, device="cpu")
    ann = load_annotations(scenes)  # seed 11: not the training seed
    regions = ann.by_image()
    ids = sorted(ann.images)
    props = proposer.batch([ann.images[i].path for i in ids])
    assert all(len(p) <= 30 for p in props)
    truths = [torch.tensor([r.box for r in regions[i]]) for i in ids]
    assert box_recall([p.boxes for p in props], truths) >= 0.9
