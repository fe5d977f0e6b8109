"""Modality adapters by modality name; a model type reaches one through its registered modality."""

from service.modalities import action, caption, encoder, image, text
from service.modalities.base import ModalityAdapter

ADAPTERS: dict[str, ModalityAdapter] = {"text": text.ADAPTER, "caption": caption.ADAPTER, "image": image.ADAPTER,
                                       "encoder": encoder.ADAPTER, "action": action.ADAPTER}
