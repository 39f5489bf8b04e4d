"""networks.create / networks.NETWORKS, including instantiation from a MONAI bundle config."""

from __future__ import annotations

import pytest
from monai.bundle import ConfigParser

import networks
from networks.student import ResNet18Student
from networks.unetpp import UNetPlusPlus


def test_names():
    assert networks.NETWORKS == ("unetpp_teacher", "resnet18_student", "transfuse_s", "transfuse_l")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        networks.create("unet")
    for name in networks.NETWORKS:
        assert name in str(err.value)


def test_create_passes_monai_argument_names():
    net = networks.create("unetpp_teacher", spatial_dims=3, in_channels=2, out_channels=4, features="tiny")
    assert isinstance(net, UNetPlusPlus)
    assert (net.spatial_dims, net.in_channels, net.out_channels) == (3, 2, 4)
    with pytest.raises(TypeError):
        networks.create("unetpp_teacher", num_classes=3)


def test_bundle_config_instantiation():
    config = {
        "network_def": {
            "_target_": "networks.create",
            "name": "resnet18_student",
            "spatial_dims": 2,
            "in_channels": 5,
            "out_channels": 3,
            "base_width": 8,
        }
    }
    net = ConfigParser(config).get_parsed_content("network_def")
    assert isinstance(net, ResNet18Student)
    assert (net.in_channels, net.out_channels, net.widths) == (5, 3, (4, 8, 16, 32))


def test_bundle_config_transfuse_with_list_img_size():
    from networks.transfuse import TransFuse

    config = {
        "net": {
            "_target_": "networks.create",
            "name": "transfuse_l",
            "spatial_dims": 2,
            "in_channels": 5,
            "out_channels": 3,
            "img_size": [32, 48],
            "embed_dim": 16,
            "depth": 1,
            "num_heads": 2,
            "cnn_widths": [4, 8, 16],
            "cnn_layers": [1, 1, 1],
            "decoder_channels": [8, 4],
            "head_channels": 4,
        }
    }
    net = ConfigParser(config).get_parsed_content("net")
    assert isinstance(net, TransFuse) and net.img_size == (32, 48) and net.transformer.grid == (2, 3)
    assert net.cnn.block == "res2net" and net.transformer.depth == 1
