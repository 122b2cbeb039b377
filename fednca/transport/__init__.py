"""Message transport: one small client interface, an MQTT (paho) and an in-memory implementation."""
