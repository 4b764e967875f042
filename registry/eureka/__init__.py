"""Eureka adapter: ``registry.eureka.source.EurekaSource`` (discovery), ``registry.eureka.registrar
.EurekaRegistrar`` (sidecar registration), ``convert`` (pure).

Nothing is imported here so that ``registry.eureka.convert`` stays importable without trio/httpx.
"""
