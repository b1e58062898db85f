"""The models config file (models.yaml, or NNSERVE_MODELS_CONFIG): which models a server serves and each
one's batching, in Triton's config.pbtxt names; its precedence under the NNSERVE_* variables; and one real
server started with a config that serves two tiny models under other names."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import requests
import yaml

from service.repository import Repository, batching_config
from service.settings import DEFAULT_MODELS, ModelConfig, Settings, SettingsError

REPO_ROOT = Path(__file__).resolve().parent.parent

FULL = """
models:
  lenet5:
    tag: lenet5-int8:abc
    max_batch_size: 16
    dynamic_batching:
      max_queue_delay_microseconds: 2500
      preferred_batch_size: [4, 8]
      default_queue_policy:
        max_queue_size: 7
        default_timeout_microseconds: 500000
  resnet_digits: {}
  char-gru.v2:
"""


def settings_from(tmp_path: Path, text: str, env: dict[str, str] | None = None, name: str = "models.yaml") -> Settings:
    path = tmp_path / name
    path.write_text(text)
    return Settings.from_env({"NNSERVE_MODELS_CONFIG": str(path), **(env or {})})


def test_a_full_yaml_file_gives_each_model_in_file_order(tmp_path):
    settings = settings_from(tmp_path, FULL)
    assert [m.name for m in settings.models] == ["lenet5", "resnet_digits", "char-gru.v2"]
    assert settings.model("lenet5") == ModelConfig(
        "lenet5", "lenet5-int8:abc", max_batch_size=16, max_queue_delay_ms=2.5, preferred_batch_sizes=(4, 8),
        max_queue_size=7, queue_timeout_ms=500.0)
    # Entries that set nothing ({} or an empty value) take every default.
    assert settings.model("resnet_digits") == ModelConfig("resnet_digits", "resnet_digits:latest")
    assert settings.model("char-gru.v2") == ModelConfig("char-gru.v2", "char-gru.v2:latest")
    assert settings.model_tags == {"lenet5": "lenet5-int8:abc", "resnet_digits": "resnet_digits:latest",
                                   "char-gru.v2": "char-gru.v2:latest"}
    described = settings.describe()
    assert "lenet5: tag='lenet5-int8:abc' max_batch_size=16 max_queue_delay_ms=2.5 preferred_batch_sizes=[4, 8] " \
           "max_queue_size=7 queue_timeout_ms=500.0" in described
    assert "resnet_digits: tag='resnet_digits:latest'" in described


def test_json_is_read_by_the_same_loader(tmp_path):
    as_json = json.dumps(yaml.safe_load(FULL))
    assert settings_from(tmp_path, as_json, name="models.json").models == settings_from(tmp_path, FULL).models


def test_the_batcher_gets_each_models_own_config_in_seconds(tmp_path):
    settings = settings_from(tmp_path, FULL)
    config = batching_config(settings.model("lenet5"))
    assert (config.max_batch_size, config.max_queue_delay_s, config.preferred_batch_sizes, config.max_queue_size,
            config.queue_timeout_s) == (16, 0.0025, (4, 8), 7, 0.5)
    assert Repository(settings).names() == ["lenet5", "resnet_digits", "char-gru.v2"]  # exactly these, in order


def test_the_repo_models_yaml_serves_the_four_defaults_with_todays_values():
    settings = Settings.from_env({"NNSERVE_MODELS_CONFIG": str(REPO_ROOT / "models.yaml")})
    assert settings.models == Settings().models
    assert [m.name for m in settings.models] == list(DEFAULT_MODELS)
    assert "models.yaml" in yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())["include"]
    assert "`NNSERVE_MODELS_CONFIG`" in (REPO_ROOT / "docs" / "service.md").read_text()


ERRORS = [
    # (file text, the message: file, model and key path)
    ("models:\n  lenet5:\n    dynamic_batching: {max_queue_delay_microseconds: -5}\n",
     "models.yaml: models.lenet5.dynamic_batching.max_queue_delay_microseconds: must be >= 0, got -5"),
    ("models:\n  lenet5: {max_batch: 4}\n", "models.yaml: models.lenet5.max_batch: unknown key"),
    ("models:\n  lenet5: {dynamic_batching: {max_queue_delay_ms: 4}}\n",
     "models.yaml: models.lenet5.dynamic_batching.max_queue_delay_ms: unknown key"),
    ("models:\n  lenet5: {dynamic_batching: {default_queue_policy: {timeout_action: REJECT}}}\n",
     "models.lenet5.dynamic_batching.default_queue_policy.timeout_action: unknown key"),
    ("models: {lenet5: {}}\nversion: 2\n", "models.yaml: (top level): must be a mapping with the one key 'models'"),
    ("models:\n  lenet5: {max_batch_size: '32'}\n", "models.yaml: models.lenet5.max_batch_size: must be an integer"),
    ("models:\n  lenet5: {max_batch_size: true}\n", "models.lenet5.max_batch_size: must be an integer, got True"),
    ("models:\n  lenet5: {max_batch_size: 0}\n", "models.lenet5.max_batch_size: must be >= 1, got 0"),
    ("models:\n  lenet5: {tag: 5}\n", "models.lenet5.tag: must be a BentoML store tag"),
    ("models:\n  lenet5: {tag: 'Lenet5:latest'}\n", "models.lenet5.tag: must be a BentoML store tag"),
    ("models:\n  lenet5: {dynamic_batching: [1]}\n", "models.lenet5.dynamic_batching: must be a mapping"),
    ("models:\n  lenet5: {dynamic_batching: {preferred_batch_size: 8}}\n",
     "models.lenet5.dynamic_batching.preferred_batch_size: must be a list of integers >= 1, got 8"),
    ("models:\n  lenet5: {dynamic_batching: {preferred_batch_size: [0, 4]}}\n",
     "models.lenet5.dynamic_batching.preferred_batch_size: must be a list of integers >= 1, got [0, 4]"),
    ("models:\n  lenet5: {max_batch_size: 8, dynamic_batching: {preferred_batch_size: [4, 16]}}\n",
     "models.yaml: models.lenet5: preferred batch sizes [4, 16] (models.lenet5.dynamic_batching.preferred_batch_size)"
     " must be in [1, max_batch_size] = [1, 8] (models.lenet5.max_batch_size)"),
    ("models:\n  lenet5: {dynamic_batching: {default_queue_policy: {max_queue_size: -1}}}\n",
     "models.lenet5.dynamic_batching.default_queue_policy.max_queue_size: must be >= 1, got -1"),
    ("models:\n  lenet5: {dynamic_batching: {max_queue_delay_microseconds: 5000,"
     " default_queue_policy: {default_timeout_microseconds: 5000}}}\n",
     "models.yaml: models.lenet5: the queue timeout, 5.0 ms (models.lenet5.dynamic_batching.default_queue_policy."
     "default_timeout_microseconds), must be larger than the max queue delay, 5.0 ms "
     "(models.lenet5.dynamic_batching.max_queue_delay_microseconds), or 0"),
    ("models: {}\n", "models.yaml: models: must be a non-empty mapping"),
    ("models:\n", "models.yaml: models: must be a non-empty mapping"),
    ("", "models.yaml: (top level): must be a mapping"),
    ("models:\n  Lenet5: {}\n", "models.yaml: models.Lenet5: a model name has at most 63 characters"),
    ("models:\n  -lenet5: {}\n", "models.yaml: models.-lenet5: a model name"),
    (f"models:\n  {'a' * 64}: {{}}\n", f"models.{'a' * 64}: a model name has at most 63 characters"),
    ("models:\n  char-gru: {}\n  char_gru: {}\n",
     "models.yaml: models.char_gru: its variables (NNSERVE_CHAR_GRU_TAG, ...) would be those of model 'char-gru'"),
    ("models: [lenet5\n", "models.yaml: not valid YAML or JSON"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_an_unusable_file_is_refused_naming_the_file_model_and_key(tmp_path, text, message):
    with pytest.raises(SettingsError) as raised:
        settings_from(tmp_path, text)
    # The message starts with the file's path as it was given.
    assert message.replace("models.yaml", str(tmp_path / "models.yaml"), 1) in str(raised.value)


def test_a_model_listed_twice_is_named(tmp_path):
    # PyYAML would keep the second silently; the loader names the key (checked apart: the text is YAML's own).
    with pytest.raises(SettingsError, match="models.yaml: not valid YAML or JSON: .*duplicate key 'lenet5'"):
        settings_from(tmp_path, "models:\n  lenet5: {}\n  lenet5: {max_batch_size: 4}\n")


def test_per_model_variables_beat_the_file_which_beats_the_globals(tmp_path):
    text = """
models:
  resnet-digits.v2:
    tag: resnet_digits:abc
    max_batch_size: 8
    dynamic_batching: {max_queue_delay_microseconds: 2000}
  vgg_fc7: {}
"""
    env = {"NNSERVE_MAX_BATCH_SIZE": "16", "NNSERVE_MAX_QUEUE_DELAY_MS": "1", "NNSERVE_MAX_QUEUE_SIZE": "9",
           "NNSERVE_PREFERRED_BATCH_SIZES": "2,4", "NNSERVE_QUEUE_TIMEOUT_MS": "300",
           # "-" and "." of the name are "_" in its variables
           "NNSERVE_RESNET_DIGITS_V2_TAG": "resnet_digits-int8:def",
           "NNSERVE_RESNET_DIGITS_V2_MAX_QUEUE_DELAY_MS": "3"}
    settings = settings_from(tmp_path, text, env)
    # The variable over the file (tag, delay), the file over the global (max_batch_size), the global
    # where the file says nothing (preferred sizes, queue size, timeout).
    assert settings.model("resnet-digits.v2") == ModelConfig(
        "resnet-digits.v2", "resnet_digits-int8:def", max_batch_size=8, max_queue_delay_ms=3.0,
        preferred_batch_sizes=(2, 4), max_queue_size=9, queue_timeout_ms=300.0)
    assert settings.queue_delay_ms("resnet-digits.v2") == 3.0
    # A model the file leaves all to the globals.
    assert settings.model("vgg_fc7") == ModelConfig("vgg_fc7", "vgg_fc7:latest", 16, 1.0, (2, 4), 9, 300.0)
    # Without the variables: the file, then the globals.
    assert settings_from(tmp_path, text).model("resnet-digits.v2") == ModelConfig(
        "resnet-digits.v2", "resnet_digits:abc", max_batch_size=8, max_queue_delay_ms=2.0)


def test_values_from_different_sources_that_do_not_fit_together_name_both(tmp_path):
    text = "models:\n  lenet5: {max_batch_size: 8}\n"
    with pytest.raises(SettingsError, match=r"models.lenet5: preferred batch sizes \[16\] "
                                            r"\(NNSERVE_PREFERRED_BATCH_SIZES\) must be in \[1, max_batch_size\] = "
                                            r"\[1, 8\] \(models.lenet5.max_batch_size\)"):
        settings_from(tmp_path, text, {"NNSERVE_PREFERRED_BATCH_SIZES": "16"})
    text = "models:\n  lenet5:\n    dynamic_batching: {default_queue_policy: {default_timeout_microseconds: 4000}}\n"
    with pytest.raises(SettingsError, match=r"queue timeout, 4.0 ms \(models.lenet5.dynamic_batching.default_queue_"
                                            r"policy.default_timeout_microseconds\), must be larger than the max queue "
                                            r"delay, 4.0 ms \(NNSERVE_LENET5_MAX_QUEUE_DELAY_MS\)"):
        settings_from(tmp_path, text, {"NNSERVE_LENET5_MAX_QUEUE_DELAY_MS": "4"})
    with pytest.raises(SettingsError, match="NNSERVE_LENET5_MAX_QUEUE_DELAY_MS must be >= 0, got -1.0"):
        settings_from(tmp_path, text, {"NNSERVE_LENET5_MAX_QUEUE_DELAY_MS": "-1"})
    with pytest.raises(SettingsError, match="NNSERVE_LENET5_MAX_QUEUE_DELAY_MS='soon' is not a valid float"):
        settings_from(tmp_path, text, {"NNSERVE_LENET5_MAX_QUEUE_DELAY_MS": "soon"})


def test_a_variable_of_a_model_that_is_not_served_is_ignored_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="nnserve.settings"):
        settings = settings_from(tmp_path, "models:\n  digits: {}\n",
                                 {"NNSERVE_LENET5_TAG": "lenet5:abc", "NNSERVE_LENET5_MAX_QUEUE_DELAY_MS": "-1"})
    assert settings.models == (ModelConfig("digits", "digits:latest"),)
    assert "NNSERVE_LENET5_TAG is ignored: no served model has it (served: digits)" in caplog.text
    assert "NNSERVE_LENET5_MAX_QUEUE_DELAY_MS is ignored" in caplog.text


def test_no_file_at_the_default_path_serves_the_default_models(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # the default path is relative to the working directory
    with caplog.at_level(logging.WARNING, logger="nnserve.settings"):
        settings = Settings.from_env({"NNSERVE_MAX_BATCH_SIZE": "8", "NNSERVE_LENET5_TAG": "lenet5-int8:abc"})
    assert [m.name for m in settings.models] == list(DEFAULT_MODELS)
    assert settings.model("lenet5") == ModelConfig("lenet5", "lenet5-int8:abc", max_batch_size=8)
    assert settings.model("char_gru").tag == "char_gru:latest"
    assert "no models config models.yaml" in caplog.text and "serving the default models" in caplog.text
    assert "models (models.yaml (not found: the default models)):" in settings.describe()


def test_a_missing_file_named_by_the_variable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError, match="elsewhere.yaml: cannot read the models config"):
        Settings.from_env({"NNSERVE_MODELS_CONFIG": "elsewhere.yaml"})
    # Named explicitly, even the default name must exist.
    with pytest.raises(SettingsError, match="models.yaml: cannot read the models config"):
        Settings.from_env({"NNSERVE_MODELS_CONFIG": "models.yaml"})


def test_each_endpoints_default_is_the_first_configured_model_of_its_kind(tiny_store, tmp_path):
    """In process, on the session store: a model that failed to load stays its endpoint's default (requests
    get its reason, not another model); one not in the store yet waits for its export (its kind is unknown:
    an endpoint whose default it may be answers 503 naming it, never another model)."""
    from loadtest.faults import truncated_copy
    from service.errors import NotFound, Unavailable

    broken = truncated_copy(tiny_store["lenet5"], "digits-truncated")
    config = {"broken": {"tag": broken}, "features": {"tag": tiny_store["vgg_fc7"]}, "ghost": {"tag": "ghost:latest"},
              "poet": {"tag": tiny_store["char_gru"]}}
    settings = settings_from(tmp_path, yaml.safe_dump({"models": config}, sort_keys=False),
                             {"NNSERVE_PROVIDERS": "CPUExecutionProvider", "NNSERVE_INTRA_OP_THREADS": "1"})
    repository = Repository(settings)
    repository.load_all()
    try:
        assert set(repository.failures) == {"broken"} and set(repository.models) == {"features", "poet"}
        assert set(repository.waiting) == {"ghost"} and repository.state_of("ghost") == "loading"
        with pytest.raises(Unavailable, match="'ghost' is waiting for 'ghost' to be exported"):
            repository.get("ghost")
        assert repository.default_model("/classify") == "broken"
        with pytest.raises(Unavailable, match="model 'broken' failed to load"):
            repository.get("broken")
        assert repository.default_model("/features") == "features"
        with pytest.raises(Unavailable, match="/generate: model 'ghost' .* still loading"):
            repository.default_model("/generate")
        with pytest.raises(NotFound, match="unknown model 'nope'"):
            repository.get("nope")
    finally:
        repository.close()


@pytest.mark.integration
def test_a_server_serves_exactly_the_configured_models_under_their_names(own_server, tiny_store, session_dir):
    from service.images import blank_png

    config = session_dir / "two-models.yaml"
    config.write_text(yaml.safe_dump({"models": {
        "digits": {"tag": tiny_store["lenet5"], "max_batch_size": 4,
                   "dynamic_batching": {"max_queue_delay_microseconds": 2000}},
        "poet": {"tag": tiny_store["char_gru"]}}}, sort_keys=False))
    env = {"NNSERVE_MODELS_CONFIG": str(config), "NNSERVE_WORKERS": "1", "NNSERVE_QUEUE_TIMEOUT_MS": "60000"}
    with own_server("models-config", env) as server:
        url = server.http_url
        models = requests.get(f"{url}/models", timeout=30).json()["models"]
        classify = requests.post(f"{url}/classify", files={"image": blank_png()}, timeout=30)
        generate = requests.post(f"{url}/generate", json={"prompt": "a", "max_new_chars": 5, "seed": 1}, timeout=30)
        features = requests.post(f"{url}/features", files={"image": blank_png()}, timeout=30)
        wrong_kind = requests.post(f"{url}/classify", files={"image": blank_png()}, data={"model": "poet"}, timeout=30)
        v2 = requests.get(f"{url}/v2/models/digits", timeout=30)
        old_name = requests.get(f"{url}/v2/models/lenet5", timeout=30)
        log = server.log()
    why = f"{models}\n{log}"
    assert [m["name"] for m in models] == ["digits", "poet"], why
    digits, poet = models
    assert digits["state"] == poet["state"] == "ready", why
    assert (digits["store_tag"], digits["kind"]) == (tiny_store["lenet5"], "image_classifier"), why
    assert (poet["store_tag"], poet["kind"]) == (tiny_store["char_gru"], "sequence_lm"), why
    assert digits["batching"] == {"max_batch_size": 4, "max_queue_delay_ms": 2.0, "preferred_batch_sizes": [],
                                  "max_queue_size": 128, "queue_timeout_ms": 60000.0}, why
    assert poet["batching"] == {"max_batch_size": 32, "max_queue_delay_ms": 0.0, "preferred_batch_sizes": [],
                                "max_queue_size": 128, "queue_timeout_ms": 60000.0}, why
    # No model field: each endpoint takes the first configured model of its kind.
    assert classify.status_code == 200 and classify.json()["model"].startswith("digits:"), classify.text
    assert generate.status_code == 200 and generate.json()["model"].startswith("poet:"), generate.text
    assert features.status_code == 404, features.text
    assert "/features needs a model of kind image_feature_extractor and none is served" in features.json()["error"]
    assert wrong_kind.status_code == 400 and "poet" in wrong_kind.json()["error"], wrong_kind.text
    assert v2.status_code == 200 and v2.json()["name"] == "digits", v2.text
    assert old_name.status_code == 404, old_name.text
    # The start-up log shows each model's effective config.
    assert "digits: tag=" in log and "max_batch_size=4 max_queue_delay_ms=2.0" in log, log
