"""Predictive alerting (:9092): forecasts, anomaly detection, alerts to Alertmanager."""
