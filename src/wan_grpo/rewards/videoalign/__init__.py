"""VideoAlign's VideoReward (Qwen2-VL-2B, outputs VQ, MQ, TA), scored in memory as the official inference."""
