import pytest

from afina.config import RecipeError, load_recipe, recipe_to_yaml


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_fill_every_section():
    recipe = load_recipe(None)
    assert recipe.model.name == "smollm2-135m-instruct"
    assert recipe.method.type == "lora" and recipe.method.r == 16
    text = recipe_to_yaml(recipe)
    for key in ("model:", "data:", "method:", "training:", "eval:", "export:", "learning_rate:"):
        assert key in text


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    path = write(tmp_path, "training:\n  learnig_rate: 0.1\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "training.learnig_rate" in message
    assert "learning_rate" in message  # the suggestion
    assert str(path) in message


def test_wrong_type_names_key_and_given_value(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, "training:\n  epochs: many\n"))
    assert "training.epochs" in str(err.value) and "'many'" in str(err.value)


def test_out_of_range_names_the_bound():
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["method.r=0"])
    assert "method.r" in str(err.value) and "greater than or equal to 1" in str(err.value)


def test_literal_lists_allowed_values():
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["method.type=qlorax"])
    assert "method.type" in str(err.value) and "'lora'" in str(err.value)


def test_overrides_are_typed_and_beat_the_file(tmp_path):
    recipe = load_recipe(
        write(tmp_path, "training:\n  epochs: 5\n"), ["training.epochs=2", "method.target_modules=[q_proj,v_proj]"]
    )
    assert recipe.training.epochs == 2.0
    assert recipe.method.target_modules == ["q_proj", "v_proj"]


def test_malformed_override_is_explained():
    with pytest.raises(RecipeError, match="key.sub=value"):
        load_recipe(None, ["training.epochs"])


def test_recipe_must_be_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_relative_data_path_resolves_from_recipe_folder(tmp_path):
    recipe = load_recipe(write(tmp_path, "data:\n  path: rows.jsonl\n"))
    assert recipe.resolve_path(recipe.data.path) == tmp_path / "rows.jsonl"


def test_overrides_reach_list_items():
    from afina.config import RecipeError, apply_overrides

    data = {"stages": [{"name": "a"}, {"name": "b", "training": {"epochs": 1}}]}
    apply_overrides(data, ["stages.1.replay=0.2", "stages.1.training.epochs=2", "training.epochs=3"])
    assert data["stages"][1] == {"name": "b", "training": {"epochs": 2}, "replay": 0.2}
    assert data["training"] == {"epochs": 3}
    with pytest.raises(RecipeError, match="item number"):
        apply_overrides(data, ["stages.5.replay=0.1"])
    with pytest.raises(RecipeError, match="is a value"):
        apply_overrides(data, ["stages.0.name.first=x"])


def test_the_older_tensorboard_switch_still_sets_report_to():
    """Recipes written before training.report_to keep working: tensorboard false/true edits the tracker list."""
    assert load_recipe(None, ["training.tensorboard=false"]).training.report_to == []
    assert load_recipe(None, ["training.tensorboard=true", "training.report_to=[mlflow]"]).training.report_to == [
        "tensorboard",
        "mlflow",
    ]
    with pytest.raises(RecipeError, match="tensorboard"):
        load_recipe(None, ["training.tensorboard=maybe"])
