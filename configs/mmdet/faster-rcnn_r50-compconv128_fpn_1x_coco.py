# Faster R-CNN R50-FPN 1x on COCO (mmdet 3.3.0's recipe) with a CompConv128-patched ResNet-50 backbone.
#
# Run from an mmdetection 3.x checkout whose environment has compconv installed
# (scripts/setup_mmdet.sh builds one):
#   python tools/train.py /path/to/compconv/configs/mmdet/faster-rcnn_r50-compconv128_fpn_1x_coco.py \
#       --cfg-options model.backbone.checkpoint=/path/to/train_cls/last.pt data_root=/datasets/coco/
# No ImageNet-pretrained CompConv weights exist: `checkpoint` takes a train_cls.py checkpoint of
# resnet50_compconv128; left None, the backbone trains from scratch (expect far lower AP than 1x
# with a pretrained backbone).
_base_ = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"

custom_imports = dict(imports=["compconv.integrations.mmdet"], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type="CompConvResNet",
        model_name="resnet50_compconv128",
        out_indices=(1, 2, 3, 4),  # timm feature indices: layer1..layer4, strides 4..32
        frozen_stages=1,
        norm_eval=True,
        checkpoint=None,
    ),
    neck=dict(in_channels=[256, 512, 1024, 2048]),
)
