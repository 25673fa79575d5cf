"""The params resource: params.yaml loaded and validated once per run (or sensor tick)."""

import dagster as dg
from pydantic import PrivateAttr

from wine_assets.params import PARAMS_ENV_VAR, LaunchParams, Params, ParamsError, load_params


class WineParamsResource(dg.ConfigurableResource):
    """Pipeline parameters from params.yaml, with optional per-run overrides.

    Leave ``params_file`` empty to use ``$WINE_ASSETS_PARAMS`` or ``./params.yaml``.
    ``overrides`` takes ``section.key=value`` strings, e.g. ``model.n_estimators=50``.

    In a run, the file is the one the run was launched with: the project's executor resolves it
    to an absolute path when the run starts and tags the run with it (see ``LaunchParams``), so a
    step on a worker in another folder reads the same file, or fails naming it.
    """

    params_file: str | None = None
    overrides: list[str] = []

    _params: Params | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        launch = None
        if context.dagster_run is not None:
            # The executor tags the run in the instance when the run starts; the in-process executor
            # hands its steps the run as it was before that, so the stored run is read.
            run = context.instance.get_run_by_id(context.dagster_run.run_id) if context.instance else None
            try:
                launch = LaunchParams.from_tags((run or context.dagster_run).tags)
            except ParamsError as exc:
                raise self._failure(exc) from exc
        if launch is not None and launch.params_file is None:
            context.log.warning(
                "no params file existed when this run was launched: built-in defaults, paths relative to %s",
                launch.base_dir,
            )
        self._params = self._load(launch)

    def _load(self, launch: LaunchParams | None = None) -> Params:
        try:
            if launch is not None:
                return launch.load(self.overrides)
            return load_params(self.params_file, self.overrides)
        except ParamsError as exc:
            raise self._failure(exc, launch) from exc

    def _failure(self, exc: ParamsError, launch: LaunchParams | None = None) -> dg.Failure:
        if launch is not None:
            where = str(launch.params_file) if launch.params_file else "built-in defaults (no file at launch)"
        else:
            where = self.params_file or f"${PARAMS_ENV_VAR} or ./params.yaml"
        return dg.Failure(description=f"invalid parameters: {exc}", metadata={"params_file": where})

    @property
    def values(self) -> Params:
        """The validated params (loaded on first use outside a run, e.g. in a direct call)."""
        if self._params is None:
            self._params = self._load()
        return self._params
