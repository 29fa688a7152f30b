"""`cachegen serve` settings: env < YAML < flags, and the store URL the connector gets."""

from __future__ import annotations

import argparse

from server.api_cli import load_settings, register


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser)
    return parser.parse_args(list(argv))


def test_layers_env_then_yaml_then_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEGEN_SERVER__PORT", "7000")
    monkeypatch.setenv("CACHEGEN_SERVER__HOST", "0.0.0.0")
    monkeypatch.setenv("CACHEGEN_STORE__TOKEN", "env-token")
    config = tmp_path / "cachegen.yaml"
    config.write_text("server:\n  port: 7100\n  max_body_bytes: 1000\nstore:\n  url: grpc://10.0.0.1:50051\n")
    settings = load_settings(_args("--config", str(config), "--port", "7200"))
    assert settings.server.port == 7200  # flag beats YAML beats env
    assert settings.server.max_body_bytes == 1000  # from YAML
    assert settings.server.host == "0.0.0.0"  # env, untouched by YAML or flags
    assert settings.store.resolved_url(settings.store_url()) == "grpc://10.0.0.1:50051?timeout_s=5&token=env-token"


def test_defaults_serve_the_local_disk_store(tmp_path, monkeypatch):
    monkeypatch.delenv("CACHEGEN_STORE__URL", raising=False)
    settings = load_settings(_args("--home", str(tmp_path)))
    assert settings.store.resolved_url(settings.store_url()) == f"disk://{tmp_path / 'kv'}"
    assert settings.contexts_dir() == tmp_path / "contexts"
    assert settings.server.api_keys == {} and settings.server.is_prefix_caching


def test_flags_set_store_token_and_prefix_caching(tmp_path):
    settings = load_settings(
        _args("--store", "grpc://h:1?timeout_s=2", "--store-token", "t0ken-123", "--no-prefix-caching")
    )
    assert settings.store.resolved_url("") == "grpc://h:1?timeout_s=2&token=t0ken-123"
    assert not settings.server.is_prefix_caching
