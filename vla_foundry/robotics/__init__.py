"""Robotics side files of a policy experiment (format spec §8.3, §12): the normalizer
(``stats.json`` + ``config_normalizer.yaml``), the robot's I/O contract
(``config_processor.yaml`` + ``preprocessing_config.yaml``) and the observation processor
that turns raw camera frames, proprioception and an instruction into model inputs."""
