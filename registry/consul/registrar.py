"""Consul registrar: the sidecar's instance as an agent service with a TTL check.

``ConsulRegistrar(address=None, token=None, ttl=DEFAULT_CHECK_TTL,
deregister_after=DEFAULT_DEREGISTER_AFTER)``:

* ``register`` -> ``PUT /v1/agent/service/register?replace-existing-checks=true`` with ID =
  ``Instance.instance_id``, labels as ``key=value`` tags and ``Meta`` (``Meta.protocol`` =
  ``Instance.protocol``), one TTL check ``service:<id>`` (initially passing) with
  ``DeregisterCriticalServiceAfter`` so a VM that dies without deregistering is first
  filtered out by ``?passing`` after ``ttl`` and then reaped (Consul: minimum 1m, reaper
  every 30 s — api-docs/agent/check.mdx);
* ``heartbeat`` -> ``PUT /v1/agent/check/pass/service:<id>`` every ``heartbeat_interval`` =
  ttl/3 (ecosystem-conventions §2); an unknown check (agent restarted, service reaped) ->
  register again;
* ``deregister`` -> ``PUT /v1/agent/service/deregister/<id>`` (unknown id is not an error).

Talks to the local agent (``address``/``token`` like the consul CLI, incl. ``CONSUL_HTTP_ADDR``
and ``CONSUL_HTTP_TOKEN``). Every failure raises ``RegistryError``.
"""

from __future__ import annotations

from consul.exceptions import ConsulException

from meshd.errors import RegistryError
from registry.consul import convert
from registry.consul.transport import TrioConsul
from registry.model import Instance

DEFAULT_CHECK_TTL = 15.0  # seconds; Consul TTL checks are commonly 10-15 s
DEFAULT_DEREGISTER_AFTER = 60.0  # seconds; Consul's minimum DeregisterCriticalServiceAfter (1m)


class ConsulRegistrar:
    """A ``Registrar`` on a Consul agent (see the module docstring)."""

    def __init__(self, address: str | None = None, token: str | None = None, *,
                 ttl: float = DEFAULT_CHECK_TTL, deregister_after: float = DEFAULT_DEREGISTER_AFTER) -> None:
        self.address, self.token = address, token
        self.ttl, self.deregister_after = ttl, deregister_after
        self.heartbeat_interval = ttl / 3

    def _client(self) -> TrioConsul:
        return TrioConsul(self.address, self.token)

    async def register(self, inst: Instance) -> None:
        fields = convert.registration(inst, self.ttl, self.deregister_after)
        try:
            async with self._client() as c:
                ok = await c.agent.service.register(**fields, replace_existing_checks=True)
        except (ConsulException, RegistryError) as err:
            raise RegistryError(f"consul register {inst.instance_id}: {err}") from err
        if not ok:
            raise RegistryError(f"consul register {inst.instance_id}: refused")

    async def heartbeat(self, inst: Instance) -> None:
        try:
            async with self._client() as c:
                ok = await c.agent.check.ttl_pass(convert.check_id(inst))
        except RegistryError as err:
            raise RegistryError(f"consul heartbeat {inst.instance_id}: {err}") from err
        except ConsulException:
            ok = False  # older agents answer 500 "CheckID ... does not have associated TTL"
        if not ok:  # 404 unknown check: the agent forgot us
            await self.register(inst)

    async def deregister(self, inst: Instance) -> None:
        try:
            async with self._client() as c:
                await c.agent.service.deregister(inst.instance_id)
        except (ConsulException, RegistryError) as err:
            raise RegistryError(f"consul deregister {inst.instance_id}: {err}") from err
