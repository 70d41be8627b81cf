"""Where exits go: indices, names and nodes mean the same place; torchvision matches timm."""
import timm
import torch
import torchvision

import timm_exits


def test_resnet50_stages_are_feature_info():
    model = timm_exits.wrap(timm.create_model("resnet50", num_classes=5), stages=[1, 2, 3])
    assert model.stages == ["layer1", "layer2", "layer3"]
    assert [h.fc.in_features for h in model.exits] == [256, 512, 1024]


def test_index_name_and_negative_index_agree(resnet18):
    x = torch.randn(2, 3, 32, 32)
    built = [timm_exits.wrap(resnet18, stages=s) for s in ([1, 2], ["layer1", "layer2"], [-4, -3])]
    assert all(m.stages == ["layer1", "layer2"] for m in built)
    for m in built[1:]:
        m.load_state_dict(built[0].state_dict())
    outs = [m.eval()(x) for m in built]
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b)


def test_graph_node_as_stage(resnet18):
    nodes = timm_exits.graph_node_names(resnet18)
    inner = next(n for n in nodes if n.startswith("layer2_0_act1"))
    model = timm_exits.wrap(resnet18, stages=[inner, "layer3"])
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    outs = model(x)
    torch.testing.assert_close(outs[-1], resnet18.eval()(x), rtol=0, atol=0)  # carried skip connection intact
    assert model.exits[0].fc.in_features == 128


def test_torchvision_indices_mean_what_timm_indices_mean():
    names = [s.name for s in timm_exits.list_stages(torchvision.models.resnet50())]
    assert names == ["relu", "layer1", "layer2", "layer3", "layer4"]
    mobile = timm_exits.list_stages(torchvision.models.mobilenet_v3_large())
    timm_mobile = timm_exits.list_stages(timm.create_model("mobilenetv3_large_100"))
    assert [s.reduction for s in mobile] == [s.reduction for s in timm_mobile] == [2, 4, 8, 16, 32]
    assert [s.channels for s in mobile[1:4]] == [s.channels for s in timm_mobile[1:4]]


def test_vit_stages_are_blocks():
    stages = timm_exits.list_stages(torchvision.models.vit_b_16(image_size=32))
    assert len(stages) == 12 and stages[3].name == "encoder.layers.encoder_layer_3"
    assert all(s.layout == "NLC" for s in stages) and stages[-1].final


def test_swin_features_are_nhwc():
    model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=5, img_size=32, window_size=2)
    stages = timm_exits.list_stages(model)
    assert [s.layout for s in stages] == ["NHWC"] * 4
    assert [s.reduction for s in stages] == [4, 8, 16, 32]


def test_list_stages_marks_only_the_last_final(resnet18):
    stages = timm_exits.list_stages(resnet18)
    assert [s.final for s in stages] == [False] * 4 + [True]
    assert [s.index for s in stages] == list(range(5))


def test_token_models_whose_token_count_drops_get_one_stage_per_scale():
    # mvitv2's feature_info names modules that do not exist ("block.0"); its stages are found in
    # the graph, where the token count drops 3136 -> 784 -> 196 -> 49 and sizes ride along as ints
    stages = timm_exits.list_stages(timm.create_model("mvitv2_tiny"))
    assert [s.name for s in stages[:3]] == ["stages.0", "stages.1", "stages.2"]
    assert [s.channels for s in stages] == [96, 192, 384, 768]
