"""Consul adapter: ``registry.consul.source.ConsulSource`` (discovery), ``registry.consul.registrar
.ConsulRegistrar`` (sidecar registration), ``convert`` (pure), ``transport`` (py-consul on trio).

Nothing is imported here so that ``registry.consul.convert`` stays importable without trio/httpx.
"""
