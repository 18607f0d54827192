"""The observability kit: Prometheus scrape configuration, recording and alerting rules (:9094)
and Grafana dashboards (:9093), generated from ``citadel.metrics``'s catalogue and the SLOs."""
