from pathlib import Path

import pytest
import yaml

from wine_assets.params import (
    MAX_YAML_ALIASES,
    LaunchParams,
    Params,
    ParamsError,
    load_params,
    load_yaml,
    model_section_change,
    params_from_mapping,
    params_to_yaml,
    write_params_change,
)

from .support import REPO_ROOT


@pytest.mark.unit
def test_repository_params_equal_the_defaults():
    loaded = load_params(REPO_ROOT / "params.yaml")
    assert loaded == Params()
    assert loaded.source_file == (REPO_ROOT / "params.yaml").resolve()


@pytest.mark.unit
def test_relative_paths_resolve_against_the_params_folder_not_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "config"
    folder.mkdir()
    path = folder / "p.yaml"
    path.write_text("paths: {artifacts_dir: out, registry_dir: /abs/reg}\ndata: {source: data/w.csv}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    params = load_params(path)
    assert params.artifacts_dir == folder / "out"
    assert params.registry_dir == Path("/abs/reg")
    assert params.data_source_path == folder / "data" / "w.csv"


@pytest.mark.unit
def test_environment_variable_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "other.yaml"
    path.write_text("model: {n_estimators: 7}\n")
    monkeypatch.setenv("WINE_ASSETS_PARAMS", str(path))
    assert load_params().model.n_estimators == 7


@pytest.mark.unit
def test_missing_file_named_by_environment_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WINE_ASSETS_PARAMS", str(tmp_path / "nope.yaml"))
    with pytest.raises(ParamsError, match=r"nope\.yaml.*WINE_ASSETS_PARAMS"):
        load_params()


@pytest.mark.unit
def test_without_any_file_the_defaults_apply(tmp_path):
    params = load_params()
    assert params == Params()
    assert params.source_file is None
    assert params.artifacts_dir == (tmp_path / "artifacts").resolve()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("data", "test_size", 1.5, r"data\.test_size = 1\.5 is out of range; allowed: 0 < value < 1"),
        ("data", "test_size", 0, r"data\.test_size = 0 is out of range"),
        (
            "evaluation",
            "min_accuracy",
            1.2,
            r"evaluation\.min_accuracy = 1\.2 is out of range; allowed: 0 <= value <= 1",
        ),
        ("model", "n_estimators", 0, r"model\.n_estimators = 0 is out of range; allowed: 1 <= value"),
        ("model", "n_estimators", 2.5, r"model\.n_estimators = 2\.5 is not a whole number"),
        ("model", "n_estimators", True, r"model\.n_estimators = True has the wrong type"),
        ("model", "n_jobs", 0, r"model\.n_jobs = 0 0 is not allowed"),
        ("model", "class_weight", "heavy", r"model\.class_weight = 'heavy' is not an allowed choice"),
        ("model", "max_depth", 0, r"model\.max_depth = 0 is out of range"),
        ("data", "test_size", "a lot", r"data\.test_size = 'a lot' is not a number"),
        ("data", "test_size", None, r"data\.test_size = None must not be null"),
        ("data", "source", "", r"data\.source = '' is not a non-empty text"),
        ("evaluation", "min_accuracy", float("nan"), r"not a finite number"),
    ],
)
def test_bad_values_name_the_file_key_and_allowed_range(write_params, section, key, value, expected):
    path = write_params(**{section: {key: value}})
    with pytest.raises(ParamsError, match=expected) as error:
        load_params(path)
    assert str(path) in str(error.value)


@pytest.mark.unit
def test_unknown_keys_and_sections_are_refused(write_params, tmp_path):
    with pytest.raises(ParamsError, match=r"unknown key model\.n_trees; the keys of 'model' are: family, n_estimators"):
        load_params(write_params(model={"n_trees": 5}))
    with pytest.raises(ParamsError, match=r"unknown section 'training'"):
        params_from_mapping({"training": {}})
    # YAML reads 1, yes and on as a number and a flag: keys that are not text are unknown keys too
    path = tmp_path / "odd-keys.yaml"
    path.write_text("model: {n_estimators: 5, 3: x, yes: 1}\n1: {}\n")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert "unknown key model.3" in str(error.value) and "unknown key model.True" in str(error.value)
    assert "unknown section '1'" in str(error.value)


@pytest.mark.unit
def test_malformed_documents_are_refused(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad_yaml)
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        params_from_mapping(["a", "list"])
    with pytest.raises(ParamsError, match="section 'model' must be a mapping"):
        params_from_mapping({"model": 3})


@pytest.mark.unit
def test_overrides_change_one_value_and_are_validated(write_params):
    path = write_params(model={"n_estimators": 30})
    params = load_params(path, ["model.n_estimators=5", "data.source=other.csv", "model.max_depth=null"])
    assert params.model.n_estimators == 5
    assert params.model.max_depth is None
    assert params.data_source_path == path.parent / "other.csv"
    with pytest.raises(ParamsError, match=r"model\.n_estimators = -3 is out of range"):
        load_params(path, ["model.n_estimators=-3"])
    with pytest.raises(ParamsError, match="not of the form section.key=value"):
        load_params(path, ["n_estimators=5"])
    with pytest.raises(ParamsError, match="unknown section 'modle'"):
        load_params(path, ["modle.n_estimators=5"])


@pytest.mark.unit
def test_params_round_trip_through_yaml(write_params):
    params = load_params(write_params(model={"n_estimators": 12, "class_weight": "balanced"}))
    again = params_from_mapping(yaml.safe_load(params_to_yaml(params)))
    assert again == params


@pytest.mark.unit
def test_an_override_into_a_section_that_is_not_a_mapping_names_it(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text('model: "x"\n')
    with pytest.raises(ParamsError, match="section 'model' must be a mapping"):
        load_params(path, ["model.n_estimators=5"])


@pytest.mark.unit
def test_every_problem_of_a_file_is_reported_on_a_line_of_its_own(write_params):
    path = write_params(data={"test_size": 2}, model={"n_estimators": "many", "n_trees": 3})
    with pytest.raises(ParamsError) as error:
        load_params(path)
    lines = str(error.value).splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{path}: ") for line in lines)
    assert any("data.test_size = 2 is out of range; allowed: 0 < value < 1" in line for line in lines)
    assert any("model.n_estimators = 'many' is not a whole number; allowed: 1 <= value" in line for line in lines)
    assert any("unknown key model.n_trees" in line for line in lines)


@pytest.mark.unit
def test_whole_floats_count_and_the_allowed_values_are_read_from_the_fields(write_params):
    assert load_params(write_params(model={"n_estimators": 50.0})).model.n_estimators == 50
    with pytest.raises(
        ParamsError, match=r"data\.watch_dir = \[1\] has the wrong type; allowed: a non-empty text or null"
    ):
        load_params(write_params(data={"watch_dir": [1]}))
    with pytest.raises(ParamsError, match=r"allowed: one of 'balanced', 'balanced_subsample' or null"):
        load_params(write_params(model={"class_weight": "heavy"}))


@pytest.mark.unit
def test_launch_params_travel_as_tags_and_refuse_relative_paths(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("model: {n_estimators: 9}\npaths: {artifacts_dir: out}\n")
    launch = LaunchParams.resolve(params_file)
    assert LaunchParams.from_tags(launch.to_tags()) == launch
    assert LaunchParams.from_tags({}) is None
    loaded = launch.load(["model.max_depth=3"])
    assert (loaded.model.n_estimators, loaded.model.max_depth) == (9, 3)
    assert loaded.artifacts_dir == tmp_path / "out"
    with pytest.raises(ParamsError, match=r"run tag wine_assets/params_file = 'params.yaml' is not an absolute path"):
        LaunchParams.from_tags({"wine_assets/params_file": "params.yaml", "wine_assets/params_base_dir": "/x"})
    params_file.unlink()
    with pytest.raises(ParamsError, match=rf"params file not found: {params_file} \(the file this run was launched"):
        launch.load()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("experiments", "expected"),
    [
        ({"datasets": {}}, "p.yaml: experiments.datasets: name at least one dataset"),
        ({"datasets": {"a b": "builtin"}}, "experiments.datasets: name 'a b' may hold only letters"),
        ({"datasets": 3}, "experiments.datasets = 3 is not a mapping of names to values"),
        ({"variants": {"production": {"family": "extra_trees"}}}, "'production' is the model section"),
        ({"variants": {"et": {"family": "extra_treez"}}}, "variant 'et': family = 'extra_treez' is not one of"),
        ({"variants": {"et": {"family": "extra_trees", 1: 3}}}, "hyperparameter names must be text, not 1"),
        ({"mlflow_tracking_uri": "http://10.0.0.1:5000"}, "is not allowed: only a local store"),
        ({"variants": {"lr": "logistic"}}, "variant 'lr' must be a mapping with a family"),
        ({"folds": 1}, "experiments.folds = 1 is out of range; allowed: 2 <= value <= 20"),
        ({"alpha": 1.5}, "experiments.alpha = 1.5 is out of range; allowed: 0 < value < 1"),
        ({"release_as": "staging"}, "experiments.release_as = 'staging' is not an allowed choice"),
        ({"sead": 1}, "unknown key experiments.sead"),
    ],
)
def test_experiments_section_errors_name_the_key(tmp_path, experiments, expected):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"experiments": experiments}))
    with pytest.raises(ParamsError) as raised:
        load_params(path)
    assert expected in str(raised.value)


@pytest.mark.unit
def test_experiment_variants_and_datasets_resolve(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "experiments:\n  datasets: {mine: data/w.csv, wine: builtin}\n"
        "  variants: {lr: {family: logistic_regression, C: 2}}\n"
    )
    params = load_params(path)
    assert params.dataset_source_path("mine") == tmp_path / "data" / "w.csv"
    assert params.dataset_source_path("wine") is None
    assert params.experiments.variants == {"lr": {"family": "logistic_regression", "C": 2}}
    # an override reaches the section like any other
    assert load_params(path, ["experiments.folds=3"]).experiments.folds == 3


@pytest.mark.unit
def test_the_model_section_names_a_family_and_its_own_hyperparameters(write_params):
    params = load_params(write_params(model={"family": "logistic_regression", "C": 0.5, "max_iter": 500}))
    assert params.model.family == "logistic_regression"
    assert params.model.hyperparameters() == {"C": 0.5, "max_iter": 500}
    # written back flat, without a forest's defaults
    assert params.to_dict()["model"] == {
        "family": "logistic_regression",
        "dask_scheduler": None,
        "C": 0.5,
        "max_iter": 500,
    }
    assert params_from_mapping({"model": {"n_estimators": 5}}).model.family == "random_forest"  # files keep working
    shared = load_params(write_params(model={"family": "extra_trees", "n_estimators": 7}))
    assert shared.model.hyperparameters() == {"n_estimators": 7}
    with pytest.raises(ParamsError, match=r"model.n_estimators = 'many' is not a whole number"):
        load_params(write_params(model={"family": "extra_trees", "n_estimators": "many"}))
    with pytest.raises(
        ParamsError, match=r"model.family = 'svm' is not an allowed choice; allowed: one of 'random_forest'"
    ):
        load_params(write_params(model={"family": "svm"}))
    with pytest.raises(ParamsError, match=r"dask_scheduler fits the trees of random_forest or extra_trees"):
        load_params(write_params(model={"family": "logistic_regression", "dask_scheduler": "tcp://127.0.0.1:1"}))


@pytest.mark.unit
def test_the_model_section_is_rewritten_keeping_comments_and_the_other_sections(tmp_path):
    path = tmp_path / "params.yaml"
    original = (
        "# our settings\n"
        "data:\n  source: builtin   # the built-in wines\n\n"
        "model:   # what we train\n  n_estimators: 100  # trees\n  random_state: 42\n  dask_scheduler: null\n\n"
        "serving:\n  experiment: null\n"
    )
    path.write_text(original)
    change = model_section_change(path, "logistic_regression", {"C": 1.0, "max_iter": 1000})
    assert change.changed and path.read_text() == original  # nothing written yet
    assert change.after.startswith("# our settings\ndata:\n  source: builtin   # the built-in wines\n")
    assert "model:   # what we train\n  family: logistic_regression\n  C: 1.0\n  max_iter: 1000\n" in change.after
    assert "  dask_scheduler: null\n" in change.after and "serving:\n  experiment: null\n" in change.after
    assert "-  n_estimators: 100  # trees" in change.diff and "+  family: logistic_regression" in change.diff
    write_params_change(change)
    assert load_params(path).model.hyperparameters() == {"C": 1.0, "max_iter": 1000}
    # the same model again changes nothing
    assert not model_section_change(path, "logistic_regression", {"C": 1.0, "max_iter": 1000}).changed
    # a file without a model section gets one; a change that would not validate is refused
    bare = tmp_path / "bare.yaml"
    bare.write_text("data:\n  test_size: 0.3\n")
    added = model_section_change(bare, "random_forest", {"n_estimators": 5})
    assert yaml.safe_load(added.after) == {
        "data": {"test_size": 0.3},
        "model": {"family": "random_forest", "n_estimators": 5},
    }
    with pytest.raises(ParamsError, match=r"with the new model section\): unknown key model.C"):
        model_section_change(bare, "random_forest", {"C": 1.0})
    bare.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match=r"bare.yaml: not valid YAML"):
        model_section_change(bare, "random_forest", {})


def billion_laughs() -> str:
    """The classic document: nine levels of nine aliases each under serving.host, 9^9 strings."""
    levels = ['  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        levels.append(f"  - &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "serving:\n  host:\n" + "\n".join(levels) + "\n"


@pytest.mark.unit
def test_a_billion_laughs_document_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(billion_laughs())
    with pytest.raises(ParamsError) as error:
        load_params(path)
    message = str(error.value)
    # The first alias past the limit is on the second level's line: nothing deeper was composed.
    assert message.startswith(f"{path}: serving.host[1][{MAX_YAML_ALIASES}] (line 4, column ")
    assert f"alias *l0 is one more than the {MAX_YAML_ALIASES} YAML aliases" in message
    # The round-trip writer refuses it the same way, and the file stays as it was.
    before = path.read_bytes()
    with pytest.raises(ParamsError, match=r"serving\.host\[1\]\[8\] \(line 4, column "):
        model_section_change(path, "random_forest", {"n_estimators": 5})
    assert path.read_bytes() == before


@pytest.mark.unit
def test_aliases_up_to_the_limit_load_and_one_more_is_refused_in_overrides_too(tmp_path):
    shared = "[" + ", ".join(["*seed"] * (MAX_YAML_ALIASES - 1)) + "]"
    assert load_yaml(f"a: &seed 42\nb: *seed\nc: {shared}\n", "t") == {
        "a": 42,
        "b": 42,
        "c": [42] * (MAX_YAML_ALIASES - 1),
    }
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  random_state: &seed 7\nmodel:\n  random_state: *seed\n")
    assert load_params(path).model.random_state == 7  # a shared value still works
    many = "[&x 1, " + ", ".join(["*x"] * (MAX_YAML_ALIASES + 1)) + "]"
    with pytest.raises(ParamsError) as error:
        load_params(path, overrides=[f"serving.host={many}"])
    assert f"override 'serving.host={many}': the value: [{MAX_YAML_ALIASES + 1}] (line 1, column" in str(error.value)
