"""The params resource: params.yaml loaded and validated once per run (or sensor tick)."""

import dagster as dg
from pydantic import PrivateAttr

from wine_assets.params import PARAMS_ENV_VAR, Params, ParamsError, load_params


class WineParamsResource(dg.ConfigurableResource):
    """Pipeline parameters from params.yaml, with optional per-run overrides.

    Leave ``params_file`` empty to use ``$WINE_ASSETS_PARAMS`` or ``./params.yaml``.
    ``overrides`` takes ``section.key=value`` strings, e.g. ``model.n_estimators=50``.
    """

    params_file: str | None = None
    overrides: list[str] = []

    _params: Params | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._params = self._load()

    def _load(self) -> Params:
        try:
            return load_params(self.params_file, self.overrides)
        except ParamsError as exc:
            raise dg.Failure(
                description=f"invalid parameters: {exc}",
                metadata={"params_file": self.params_file or f"${PARAMS_ENV_VAR} or ./params.yaml"},
            ) from exc

    @property
    def values(self) -> Params:
        """The validated params (loaded on first use outside a run, e.g. in a direct call)."""
        if self._params is None:
            self._params = self._load()
        return self._params
